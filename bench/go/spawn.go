// spawn.go — Go peer of bench/spawn.c: spawn N goroutines that each do one
// atomic add and exit; wait for all of them (sync.WaitGroup).
//
// Usage: spawn [n] [procs] [yield_every]   (default 1,000,000, GOMAXPROCS's
// default, 0).  yield_every = k > 0: the spawner calls runtime.Gosched()
// after every k spawns, as bench/spawn.c does with loom_yield().
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

func batch(n, yieldEvery int) time.Duration {
	var wg sync.WaitGroup
	t0 := time.Now()
	wg.Add(n)
	for i := 0; i < n; i++ {
		go func() {
			atomic.AddInt64(&counter, 1)
			wg.Done()
		}()
		if yieldEvery > 0 && (i+1)%yieldEvery == 0 {
			runtime.Gosched()
		}
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
		if p, _ := strconv.Atoi(os.Args[2]); p > 0 {
			runtime.GOMAXPROCS(p)
		}
	}
	yieldEvery := 0
	if len(os.Args) > 3 {
		yieldEvery, _ = strconv.Atoi(os.Args[3])
	}
	cold := batch(n, yieldEvery)
	warm := batch(n, yieldEvery)
	if atomic.LoadInt64(&counter) != int64(2*n) {
		fmt.Fprintln(os.Stderr, "spawn: lost goroutines")
		os.Exit(1)
	}
	fmt.Printf("RESULT name=spawn impl=go procs=%d n=%d yield_every=%d ns_per_op=%.1f cold_ns_per_op=%.1f\n",
		runtime.GOMAXPROCS(0), n, yieldEvery,
		float64(warm.Nanoseconds())/float64(n),
		float64(cold.Nanoseconds())/float64(n))
}
