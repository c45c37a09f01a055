// parked.go — Go peer of bench/parked.c: N goroutines each blocked in
// time.Sleep(1h); resident memory per goroutine from /proc/self/status.
//
// Usage: parked [n]   (default 1,000,000)
// Prints: RESULT name=parked impl=go kib_per_op=<KiB RSS per goroutine> ...
package main

import (
	"bufio"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

func vmRSSKiB() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		line := s.Text()
		if strings.HasPrefix(line, "VmRSS:") {
			fields := strings.Fields(line)
			v, _ := strconv.ParseInt(fields[1], 10, 64)
			return v
		}
	}
	return -1
}

func main() {
	n := 1000000
	if len(os.Args) > 1 {
		n, _ = strconv.Atoi(os.Args[1])
	}
	var parked int64
	before := vmRSSKiB()
	t0 := time.Now()
	for i := 0; i < n; i++ {
		go func() {
			atomic.AddInt64(&parked, 1)
			time.Sleep(time.Hour)
		}()
	}
	// The counter is bumped just before the goroutine parks; give the
	// last ones a moment to finish parking.
	for atomic.LoadInt64(&parked) < int64(n) {
		time.Sleep(time.Millisecond)
	}
	el := time.Since(t0)
	time.Sleep(20 * time.Millisecond)
	after := vmRSSKiB()
	fmt.Printf("RESULT name=parked impl=go procs=%d n=%d kib_per_op=%.3f rss_before_kib=%d rss_after_kib=%d spawn_ns_per_op=%.1f\n",
		runtime.GOMAXPROCS(0), n, float64(after-before)/float64(n), before, after,
		float64(el.Nanoseconds())/float64(n))
}
