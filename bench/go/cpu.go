// cpu.go — Go peer of bench/cpu.c: a fixed amount of CPU work split over
// many independent goroutines; run with 1 and with 2 Ps and compare.
//
// Usage: cpu <procs> [tasks] [iters]   (default 400 tasks of 1 000 000 iterations)
// Prints: RESULT name=cpu impl=go procs=<p> ms=<wall ms> ...
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

var sink uint64

// work: a serial xorshift64 chain; every step depends on the one before, so
// neither compiler can vectorise or skip it.  Same code as work() in cpu.c.
func work(seed uint64, iters int) uint64 {
	x := seed | 1
	var acc uint64
	for i := 0; i < iters; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		acc += x
	}
	return acc
}

func main() {
	procs, tasks, iters := 1, 400, 1000000
	if len(os.Args) > 1 {
		procs, _ = strconv.Atoi(os.Args[1])
	}
	if len(os.Args) > 2 {
		tasks, _ = strconv.Atoi(os.Args[2])
	}
	if len(os.Args) > 3 {
		iters, _ = strconv.Atoi(os.Args[3])
	}
	runtime.GOMAXPROCS(procs)
	var wg sync.WaitGroup
	t0 := time.Now()
	wg.Add(tasks)
	for i := 0; i < tasks; i++ {
		go func(seed uint64) {
			atomic.AddUint64(&sink, work(seed, iters))
			wg.Done()
		}(uint64(i) + 1)
	}
	wg.Wait()
	el := time.Since(t0)
	fmt.Printf("RESULT name=cpu impl=go procs=%d tasks=%d iters=%d ms=%.2f checksum=%x\n",
		procs, tasks, iters, float64(el.Nanoseconds())/1e6, atomic.LoadUint64(&sink))
}
