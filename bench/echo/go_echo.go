// go_echo.go — the Go echo server of the echo bench (bench/echo/run.sh):
// standard library, the code a Go programmer writes.
//
// One accept loop, one goroutine per connection reading into a 16 KiB
// buffer and writing back what it read (io.Copy's loop, with the buffer
// size fixed), until end of stream or an error.
//
// Usage: go_echo [-addr HOST:PORT] [-procs N]   (default 127.0.0.1:7000;
// procs 0: GOMAXPROCS's default, every CPU).  Runs until killed.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"runtime"
	"syscall"
	"time"
)

func serve(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 16384)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:7000", "listen address")
	procs := flag.Int("procs", 0, "GOMAXPROCS (0: default)")
	flag.Parse()
	if *procs > 0 {
		runtime.GOMAXPROCS(*procs)
	}
	// Go 1.19 raises the soft limit itself; say so explicitly anyway.
	var rl syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl) == nil {
		rl.Cur = rl.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "go_echo:", err)
		os.Exit(1)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			// EMFILE and the like: back off as net/http does.
			fmt.Fprintln(os.Stderr, "go_echo: accept:", err)
			time.Sleep(5 * time.Millisecond)
			continue
		}
		go serve(c)
	}
}
