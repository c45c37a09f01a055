// sync.go — the Go peer of bench/sync.c (same modes, same output line).
package main

import (
	"context"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	mode := "mutex"
	if len(os.Args) > 1 {
		mode = os.Args[1]
	}
	n := 2000000
	if mode != "mutex" {
		n = 10000
	}
	if len(os.Args) > 2 {
		n, _ = strconv.Atoi(os.Args[2])
	}
	procs := 2
	if len(os.Args) > 3 {
		procs, _ = strconv.Atoi(os.Args[3])
	}
	runtime.GOMAXPROCS(procs)
	var el, recycled, close0, rclose time.Duration
	if mode == "mutex" {
		var wg sync.WaitGroup
		var mu sync.Mutex
		shared := 0
		wg.Add(8)
		t0 := time.Now()
		for i := 0; i < 8; i++ {
			go func() {
				for j := 0; j < n/8; j++ {
					mu.Lock()
					shared++
					mu.Unlock()
				}
				wg.Done()
			}()
		}
		wg.Wait()
		el = time.Since(t0)
		if shared != (n/8)*8 {
			panic("lost updates")
		}
	} else {
		// The first crowd, then the median of the last recycledCrowds
		// of crowds (bench/sync.c says why).
		var crowd, closes [crowds]time.Duration
		for r := range crowd {
			crowd[r], closes[r] = cancelCrowd(n)
		}
		el, close0 = crowd[0], closes[0]
		last := crowd[crowds-recycledCrowds:]
		sort.Slice(last, func(i, j int) bool { return last[i] < last[j] })
		recycled = last[recycledCrowds/2]
		lastc := closes[crowds-recycledCrowds:]
		sort.Slice(lastc, func(i, j int) bool { return lastc[i] < lastc[j] })
		rclose = lastc[recycledCrowds/2]
	}
	fmt.Printf("RESULT name=sync_%s impl=go procs=%d n=%d ns_per_op=%.1f", mode, procs, n,
		float64(el.Nanoseconds())/float64(n))
	if recycled != 0 {
		fmt.Printf(" recycled_ns_per_op=%.1f close_ns_per_op=%.1f recycled_close_ns_per_op=%.1f",
			float64(recycled.Nanoseconds())/float64(n), float64(close0.Nanoseconds())/float64(n),
			float64(rclose.Nanoseconds())/float64(n))
	}
	fmt.Println()
}

const crowds, recycledCrowds = 21, 10

// cancelCrowd: n goroutines block on a context's done channel; the time
// from the cancel until all have finished, and that of the cancel call.
func cancelCrowd(n int) (time.Duration, time.Duration) {
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(context.Background())
	var parked int64
	wg.Add(n)
	for i := 0; i < n; i++ {
		go func() {
			atomic.AddInt64(&parked, 1)
			<-ctx.Done()
			wg.Done()
		}()
	}
	for atomic.LoadInt64(&parked) < int64(n) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(10 * time.Millisecond)
	t0 := time.Now()
	cancel()
	closed := time.Since(t0)
	wg.Wait()
	return time.Since(t0), closed
}
