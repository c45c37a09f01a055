// yield.go — Go peer of bench/yield.c: two goroutines on one P hand the
// processor back and forth with runtime.Gosched().
//
// Usage: yield [iters]   (iterations per goroutine; default 5,000,000)
// Prints: RESULT name=yield impl=go ns_per_op=<ns per Gosched> ...
package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync/atomic"
	"time"
)

func main() {
	iters := 5000000
	if len(os.Args) > 1 {
		iters, _ = strconv.Atoi(os.Args[1])
	}
	runtime.GOMAXPROCS(1)

	// Warm up: the same ping-pong, untimed.
	pingpong(iters / 10)

	t0 := time.Now()
	pingpong(iters)
	el := time.Since(t0)
	fmt.Printf("RESULT name=yield impl=go procs=1 iters=%d ns_per_op=%.2f\n",
		iters, float64(el.Nanoseconds())/float64(2*iters))
}

// pingpong runs `iters` Gosched calls in main and as many in a second
// goroutine; 2*iters yields in total.
func pingpong(iters int) {
	var done int32
	go func() {
		for i := 0; i < iters; i++ {
			runtime.Gosched()
		}
		atomic.StoreInt32(&done, 1)
	}()
	for i := 0; i < iters; i++ {
		runtime.Gosched()
	}
	for atomic.LoadInt32(&done) == 0 {
		runtime.Gosched()
	}
}
