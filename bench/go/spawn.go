// spawn.go — Go peer of bench/spawn.c: spawn N goroutines that each do one
// atomic add and exit; wait for all of them (sync.WaitGroup).
//
// Usage: spawn [n] [procs]   (default 1,000,000 and GOMAXPROCS's default)
// Two batches of n: the first on a cold runtime (stacks and G structs are
// allocated), the second reuses what the first left in the free lists.
// Prints: RESULT name=spawn impl=go ns_per_op=<warm> cold_ns_per_op=<cold>
package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

var counter int64

func batch(n int) time.Duration {
	var wg sync.WaitGroup
	t0 := time.Now()
	wg.Add(n)
	for i := 0; i < n; i++ {
		go func() {
			atomic.AddInt64(&counter, 1)
			wg.Done()
		}()
	}
	wg.Wait()
	return time.Since(t0)
}

func main() {
	n := 1000000
	if len(os.Args) > 1 {
		n, _ = strconv.Atoi(os.Args[1])
	}
	if len(os.Args) > 2 {
		p, _ := strconv.Atoi(os.Args[2])
		runtime.GOMAXPROCS(p)
	}
	cold := batch(n)
	warm := batch(n)
	if atomic.LoadInt64(&counter) != int64(2*n) {
		fmt.Fprintln(os.Stderr, "spawn: lost goroutines")
		os.Exit(1)
	}
	fmt.Printf("RESULT name=spawn impl=go procs=%d n=%d ns_per_op=%.1f cold_ns_per_op=%.1f\n",
		runtime.GOMAXPROCS(0), n,
		float64(warm.Nanoseconds())/float64(n),
		float64(cold.Nanoseconds())/float64(n))
}
