// go_lenpfx_echo.go — the Go server of the engine bench (bench/engine/run.sh):
// a length-prefixed echo with the standard library only, written the way a
// Go programmer who cares about speed writes a framed protocol server.
//
// A frame is a 4-byte big-endian payload length, then the payload; every
// frame is echoed back unchanged.  One accept loop, one goroutine per
// connection.  Reading: a bufio.Reader (16 KiB), io.ReadFull for the
// header and then for the payload, into a buffer kept per connection and
// grown as needed; a length over -max closes the connection.
//
// Writing, the default (-write buffered): header and payload go into a
// bufio.Writer (16 KiB), which is flushed only when the reader has no
// more input buffered, that is when no further frame can be decoded
// without a read that may block.  A client that pipelines gets its
// replies in one write per batch; a ping-pong client still gets each reply
// at once, in one write.  This is the idiomatic fast form (the pattern of
// Redis-protocol and RPC servers in Go); -write frame is the simple form,
// one conn.Write of header+payload per frame, for comparison.
//
// Usage: go_lenpfx_echo [-addr HOST:PORT] [-procs N] [-write buffered|frame]
// [-max BYTES]   (default 127.0.0.1:7000; procs 0: GOMAXPROCS's default,
// every CPU; max 1 MiB).  Runs until killed.
package main

import (
	"bufio"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"time"
)

var maxLen = flag.Int("max", 1<<20, "largest payload accepted")

// serveBuffered: replies through a bufio.Writer, flushed when the reader
// has nothing more buffered.
func serveBuffered(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 16384)
	w := bufio.NewWriterSize(c, 16384)
	var hdr [4]byte
	var buf []byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(hdr[:])
		if n > uint32(*maxLen) {
			return
		}
		if cap(buf) < int(n) {
			buf = make([]byte, n)
		}
		p := buf[:n]
		if _, err := io.ReadFull(r, p); err != nil {
			return
		}
		w.Write(hdr[:]) // a bufio.Writer's error is sticky: the next call has it
		if _, err := w.Write(p); err != nil {
			return
		}
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return
			}
		}
	}
}

// serveFrame: one conn.Write per frame, header and payload in one buffer.
func serveFrame(c net.Conn) {
	defer c.Close()
	r := bufio.NewReaderSize(c, 16384)
	buf := make([]byte, 4096)
	for {
		if _, err := io.ReadFull(r, buf[:4]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(buf[:4])
		if n > uint32(*maxLen) {
			return
		}
		if cap(buf) < 4+int(n) {
			nb := make([]byte, 4+int(n))
			copy(nb, buf[:4])
			buf = nb
		}
		f := buf[:4+int(n)]
		if _, err := io.ReadFull(r, f[4:]); err != nil {
			return
		}
		if _, err := c.Write(f); err != nil {
			return
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:7000", "listen address")
	procs := flag.Int("procs", 0, "GOMAXPROCS (0: default)")
	write := flag.String("write", "buffered", "buffered: bufio.Writer flushed when no input is buffered; frame: one Write per frame")
	flag.Parse()
	serve := serveBuffered
	switch *write {
	case "buffered":
	case "frame":
		serve = serveFrame
	default:
		fmt.Fprintln(os.Stderr, "go_lenpfx_echo: -write is buffered or frame")
		os.Exit(2)
	}
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
		fmt.Fprintln(os.Stderr, "go_lenpfx_echo:", err)
		os.Exit(1)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			// EMFILE and the like: back off as net/http does.
			fmt.Fprintln(os.Stderr, "go_lenpfx_echo: accept:", err)
			time.Sleep(5 * time.Millisecond)
			continue
		}
		go serve(c)
	}
}
