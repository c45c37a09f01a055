#!/usr/bin/env python3
"""Write the seed corpus of fuzz/fuzz_inflate.c into fuzz/corpus/inflate/.

Each seed is the target's 4-byte header (see fuzz_inflate.c) and a peer's
stream: valid ones as a loom writer sends them (length-prefixed packages,
each batch ended with Z_SYNC_FLUSH), at several windows, levels and batch
sizes, and corrupt ones (garbage, a bad header, a finished stream, a
preset dictionary, a stream cut inside a block, a flipped byte), a bomb,
and injected allocation failures.  Deterministic: run it again and the
files come out the same.

    python3 fuzz/inflate_seeds.py
"""
import os
import random
import struct
import zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus",
                   "inflate")


def header(max_pkg_shift=8, read_buf=3, raw=False, sips=False, cuts=1,
           sip_seed=0, fail=None, reader_fail=None):
    """max_pkg_len 16 << max_pkg_shift, read_buf 64 << 2 * read_buf;
    fail: the layer's allocation number `fail` fails, reader_fail: the
    session read buffer's allocation or growth number `reader_fail`."""
    b0 = (max_pkg_shift & 15) | (read_buf & 3) << 4
    b0 |= 0x40 if raw else 0
    b0 |= 0x80 if sips else 0
    b3 = 0xF0 | fail if fail is not None else 0
    if reader_fail is not None:
        b3 = 0xE0 | reader_fail
    return bytes([b0, cuts & 0xFF, sip_seed & 0xFF, b3])


def text(rng, n):
    words = [b"record", b"stream", b"of", b"the", b"session", b"loom",
             b"package", b"reply", b"window", b"block"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" %d\n" % rng.randrange(100)
    return bytes(out[:n])


def packages(rng, sizes, noise=False):
    out = []
    for n in sizes:
        body = bytes(rng.randrange(256) for _ in range(n)) if noise \
            else text(rng, n)
        out.append(struct.pack(">I", n) + body)
    return out


def batches(pkgs, per, level=6, wbits=15, mem=8, zdict=None):
    """A loom writer's stream: `per` packages a batch, each batch flushed."""
    d = zlib.compressobj(level, zlib.DEFLATED, wbits, mem,
                         zlib.Z_DEFAULT_STRATEGY, *([zdict] if zdict else []))
    out = bytearray()
    for i in range(0, len(pkgs), per):
        out += d.compress(b"".join(pkgs[i:i + per]))
        out += d.flush(zlib.Z_SYNC_FLUSH)
    return bytes(out), d


def main():
    rng = random.Random(20240601)
    seeds = {}

    small = packages(rng, [rng.randrange(1, 200) for _ in range(40)])
    s, _ = batches(small, 3)
    seeds["valid_small_batches"] = header(cuts=1) + s
    seeds["valid_small_batches_sips"] = header(sips=True, cuts=7,
                                               sip_seed=3) + s
    seeds["valid_small_batches_raw"] = header(raw=True, read_buf=1,
                                              cuts=9) + s

    big = packages(rng, [9000, 30000, 700, 20000])
    s, _ = batches(big, 1, wbits=15, mem=8)
    seeds["valid_big_packages"] = header(max_pkg_shift=12, cuts=2) + s
    s, _ = batches(big, 2, level=1, wbits=9, mem=1)
    seeds["valid_window9_mem1"] = header(max_pkg_shift=12, read_buf=2,
                                         cuts=5) + s
    s, _ = batches(big[:2], 1, level=0)
    seeds["valid_stored_blocks"] = header(max_pkg_shift=12, cuts=11) + s

    noisy = packages(rng, [3000, 12000, 50], noise=True)
    s, _ = batches(noisy, 1, wbits=12, mem=5)
    seeds["valid_noise_window12"] = header(max_pkg_shift=12, cuts=4) + s

    seeds["valid_header_only"] = header() + bytes([0x78, 0x9C])
    seeds["valid_empty"] = header()
    s, _ = batches(small[:6], 2)
    seeds["valid_then_nothing_cut_at_flush"] = header(cuts=13) + s

    # Corrupt.
    seeds["corrupt_garbage"] = header(cuts=2) + bytes(
        rng.randrange(256) for _ in range(300))
    seeds["corrupt_header_check"] = header() + bytes([0x78, 0x9D]) + s[2:]
    seeds["corrupt_not_deflate"] = header() + bytes([0x79, 0x9C]) + s[2:]
    raw = zlib.compressobj(6, zlib.DEFLATED, -15)
    seeds["corrupt_raw_deflate_no_header"] = header() + raw.compress(
        b"".join(small)) + raw.flush(zlib.Z_SYNC_FLUSH)
    fin = zlib.compress(b"".join(small), 6)
    seeds["corrupt_finished_stream"] = header(cuts=3) + fin
    s, _ = batches(small, 5, zdict=b"record stream session")
    seeds["corrupt_preset_dictionary"] = header() + s
    s, _ = batches(big[:2], 2)
    seeds["corrupt_cut_inside_a_block"] = header(max_pkg_shift=12,
                                                 cuts=6) + s[:len(s) // 2]
    # A flipped byte: a distance too far back, 100 bytes in; one in a
    # block's literals, which zlib cannot tell (no check value before
    # the stream's end) and inflates to other bytes.
    for name, at in (("corrupt_flipped_byte", 100),
                     ("flipped_byte_zlib_takes", len(s) // 3)):
        flipped = bytearray(s)
        flipped[at] ^= 0x55
        seeds[name] = header(max_pkg_shift=12, cuts=8) + bytes(flipped)
    s, _ = batches(small[:8], 2)
    seeds["corrupt_after_valid_batches"] = header(cuts=10) + s + bytes(
        [0xFF] * 40)

    # A bomb: a package header asking for 16 MiB of zeros, and the zeros.
    bomb = struct.pack(">I", 16 << 20)
    d = zlib.compressobj(9)
    z = d.compress(bomb)
    for _ in range(16):
        z += d.compress(bytes(1 << 20))
    z += d.flush(zlib.Z_SYNC_FLUSH)
    seeds["bomb_oversized_package"] = header(max_pkg_shift=8, cuts=2) + z
    seeds["bomb_raw_codec"] = header(max_pkg_shift=15, raw=True, cuts=3) + z

    # Allocations fail: the layer, inflate's state, its window, the
    # heap input buffer (when a read leaves bytes pending: -ENOMEM; when a
    # full read asks for larger gulps: the layer goes on without it).
    s, _ = batches(big[:2], 1)
    for i in range(4):
        seeds["enomem_allocation_%d" % i] = header(max_pkg_shift=12, cuts=1,
                                                   fail=i) + s
    s, _ = batches(small, 1)
    seeds["enomem_input_buffer_small_reads"] = header(cuts=21, fail=3) + s
    # The session's read buffer cannot be made, or cannot grow for a
    # package larger than read_buf.
    s, _ = batches(big[:2], 1)
    for i in range(3):
        seeds["enomem_read_buffer_%d" % i] = header(
            max_pkg_shift=12, read_buf=0, cuts=4, reader_fail=i) + s

    os.makedirs(OUT, exist_ok=True)
    for name, blob in sorted(seeds.items()):
        assert len(blob) <= 1 << 16, name  # replay.c reads 64 KiB
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(blob)
    print("%d seeds in %s" % (len(seeds), OUT))


if __name__ == "__main__":
    main()
