// chan.go — the Go peer of bench/chan.c (same modes, same output line).
package main

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"time"
)

func main() {
	mode := "pingpong"
	if len(os.Args) > 1 {
		mode = os.Args[1]
	}
	n := 1000000
	if len(os.Args) > 2 {
		n, _ = strconv.Atoi(os.Args[2])
	}
	procs := 2
	if mode == "pingpong" {
		procs = 1
	}
	if len(os.Args) > 3 {
		procs, _ = strconv.Atoi(os.Args[3])
	}
	runtime.GOMAXPROCS(procs)
	var el time.Duration
	switch mode {
	case "pingpong":
		a, b := make(chan int), make(chan int)
		go func() {
			for v := range a {
				b <- v
			}
		}()
		for i := 0; i < n/10; i++ {
			a <- i
			<-b
		}
		t0 := time.Now()
		for i := 0; i < n; i++ {
			a <- i
			<-b
		}
		el = time.Since(t0)
		close(a)
	case "mpmc":
		a := make(chan int, 128)
		var prod, cons sync.WaitGroup
		t0 := time.Now()
		for i := 0; i < 4; i++ {
			cons.Add(1)
			go func() {
				defer cons.Done()
				for range a {
				}
			}()
		}
		for i := 0; i < 4; i++ {
			prod.Add(1)
			go func() {
				defer prod.Done()
				for j := 0; j < n/4; j++ {
					a <- j
				}
			}()
		}
		prod.Wait()
		close(a)
		cons.Wait()
		el = time.Since(t0)
	default:
		var chs [4]chan int
		for i := range chs {
			chs[i] = make(chan int)
			go func(c chan int) {
				for j := 0; j < n/4; j++ {
					c <- j
				}
			}(chs[i])
		}
		t0 := time.Now()
		for i := 0; i < (n/4)*4; i++ {
			select {
			case <-chs[0]:
			case <-chs[1]:
			case <-chs[2]:
			case <-chs[3]:
			}
		}
		el = time.Since(t0)
	}
	fmt.Printf("RESULT name=chan_%s impl=go procs=%d n=%d ns_per_op=%.1f\n", mode, procs, n,
		float64(el.Nanoseconds())/float64(n))
}
