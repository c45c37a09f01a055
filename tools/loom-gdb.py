# loom-gdb.py — gdb commands for programs that run loom coroutines.
#
#   (gdb) source tools/loom-gdb.py
#   (gdb) loom-coroutines [-a]        (alias: info coroutines)
#   (gdb) loom-bt ID|all[=N] [bt options]
#
# How it finds things.  The running runtime is the file-static
# `current_rt` in src/runtime/proc.c.  There is no list of all coroutines:
# a G lives in the top bytes of its stack slot, so, like rt_free(), this
# walks every arena (rt->stacks.arenas, newest first) and every slot
# carved from it (a->ncarved), where the G is at
#     ((slot_top - sizeof(loom__g)) & ~63),
# and then the list of coroutines with a stack of their own
# (rt->stacks.custom, linked by alllink).  Struct layouts (field offsets,
# sizeof) come from the debug info, so a RelWithDebInfo or Debug build
# works and a stripped one does not.  A G's status is the G_* enum of
# src/runtime/runtime.h; an idle G is a free slot and is hidden unless -a.
#
# A parked coroutine's registers are on its own stack, at g->ctx.sp, in
# the frame loom__ctx_switch leaves (src/arch/switch.h, x86_64):
#     sp+0 MXCSR/x87 CW  sp+8 r15  sp+16 r14  sp+24 r13  sp+32 r12
#     sp+40 rbx  sp+48 rbp  sp+56 return address
# loom-bt loads those (with rsp = sp+64, where the `ret` would leave it)
# into frame 0 of the selected thread, runs `bt`, and puts the thread's
# own registers back.  So it needs a live, stopped process: registers of
# a core file cannot be written.  A coroutine that is running has no saved
# frame; its backtrace is that of the thread it runs on, which loom-bt
# names.
#
# Rejected: a gdb.unwinder that would make coroutines look like threads
# (works on cores too, but gdb has no way to list or select such a
# pseudo-thread, and it would be one more thing to keep in step with the
# scheduler); reading the layout from symbols by name only (breaks
# silently when a field moves).
#
# Keep in step with: struct loom__g / loom__m / loom__rt / loom__stacks
# (field names), the G_* enum, the frame layout in src/arch/switch.h.

import gdb

# G_* fallbacks, used only if the enumerators are missing from the debug
# info (src/runtime/runtime.h).
_G_STATES = [("G_IDLE", 0, "idle"), ("G_RUNNABLE", 1, "runnable"),
             ("G_RUNNING", 2, "running"), ("G_WAITING", 3, "waiting"),
             ("G_DEAD", 4, "dead")]

# x86_64 frame of a parked context: register -> offset from ctx.sp.
_FRAME = [("r15", 8), ("r14", 16), ("r13", 24), ("r12", 32), ("rbx", 40),
          ("rbp", 48)]
_FRAME_RET = 56
_FRAME_SIZE = 64
_SAVE_REGS = ["rsp", "rbp", "rip", "rbx", "r12", "r13", "r14", "r15"]


class LoomError(gdb.GdbError):
    pass


def _u(buf, off, size):
    return int.from_bytes(buf[off:off + size], "little")


def _field_off(t, path):
    """Byte offset and size of a (dotted) field of struct type t."""
    off = 0
    for name in path.split("."):
        t = t.strip_typedefs()
        for f in t.fields():
            if f.name == name:
                off += f.bitpos // 8
                t = f.type
                break
        else:
            raise LoomError("loom: struct has no field %r (tools/loom-gdb.py "
                            "is out of step with src/runtime/runtime.h)"
                            % path)
    return off, t.strip_typedefs().sizeof


class _Layout(object):
    """Offsets into a loom__g, read once per command from the debug info."""

    FIELDS = ["ctx.sp", "status", "custom_stack", "is_g0", "id", "fn",
              "spawn_pc", "wait_reason", "stk.base", "stk.size"]

    def __init__(self):
        try:
            self.gtype = gdb.lookup_type("loom__g").strip_typedefs()
        except gdb.error:
            raise LoomError("loom: no debug info for loom__g (build loom "
                            "RelWithDebInfo or Debug)")
        self.gsize = self.gtype.sizeof
        self.off = {f: _field_off(self.gtype, f) for f in self.FIELDS}
        self.status_names = {}
        self.status_value = {}
        for enum, fallback, word in _G_STATES:
            try:
                v = int(gdb.parse_and_eval("(int)" + enum))
            except gdb.error:
                v = fallback
            self.status_names[v] = word
            self.status_value[word] = v


class _G(object):
    """A snapshot of one loom__g."""

    def __init__(self, lay, addr, buf):
        def get(f):
            off, size = lay.off[f]
            return _u(buf, off, size)
        self.addr = addr
        self.sp = get("ctx.sp")
        st = get("status")
        self.status = lay.status_names.get(st, "status=%d" % st)
        self.custom_stack = bool(get("custom_stack"))
        self.is_g0 = bool(get("is_g0"))
        self.id = get("id")
        self.fn = get("fn")
        self.spawn_pc = get("spawn_pc")
        self.wait_reason = get("wait_reason")
        self.stk_base = get("stk.base")
        self.stk_size = get("stk.size")


def _find_rt():
    """The running runtime (a gdb.Value of type loom__rt *)."""
    if gdb.selected_inferior().pid == 0:
        raise LoomError("loom: the program is not running")
    sym = None
    try:
        cands = gdb.lookup_static_symbols("current_rt")
    except AttributeError:  # gdb < 10
        cands = []
    for s in cands:
        if "loom__rt" in str(s.type):
            sym = s
            break
    try:
        if sym is not None:
            rt = sym.value()
        else:
            rt = gdb.parse_and_eval("'proc.c'::current_rt")
    except gdb.error as e:
        raise LoomError("loom: cannot read current_rt (%s); is loom linked "
                        "in, with debug info?" % e)
    rtp = gdb.lookup_type("loom__rt").pointer()
    rt = rt.cast(rtp)
    if int(rt) == 0:
        raise LoomError("loom: no runtime is running (current_rt is NULL: "
                        "before loom_run() or after it returned)")
    return rt


def _all_gs(rt, lay):
    """Every G that has a stack slot: arena slots, then custom stacks."""
    inf = gdb.selected_inferior()
    gp = lay.gtype.pointer()
    out = []
    s = rt["stacks"]
    slot = int(s["slot_size"])

    def read(addr):
        try:
            out.append(_G(lay, addr, bytes(inf.read_memory(addr, lay.gsize))))
        except gdb.MemoryError:
            pass  # unmapped: a torn-down arena; nothing to show

    a = s["arenas"]
    while int(a) != 0:
        base = int(a["base"])
        for i in range(int(a["ncarved"])):
            top = base + (i + 1) * slot
            read((top - lay.gsize) & ~63)
        a = a["next"]
    g = s["custom"].cast(gp)
    seen = set()
    while int(g) != 0 and int(g) not in seen:
        seen.add(int(g))
        read(int(g))
        g = g["alllink"]
    return out


class _M(object):
    def __init__(self, m):
        self.addr = int(m.address)
        self.id = int(m["id"])
        self.curg = int(m["curg"])
        self.g0 = int(m["g0"].address)
        self.thread = int(m["thread"])
        p = m["p"]
        self.p = int(p["id"]) if int(p) != 0 else None
        self.in_block = bool(m["in_block"])


def _all_ms(rt):
    out = []
    m = rt["allm"]
    while int(m) != 0:
        out.append(_M(m.dereference()))
        m = m["alllink"]
    return out


def _gdb_threads():
    """pthread_t -> gdb thread number, where libthread_db tells."""
    out = {}
    for t in gdb.selected_inferior().threads():
        try:
            h = t.handle()
        except (gdb.error, AttributeError):
            continue
        if h is not None:
            out[int.from_bytes(bytes(h), "little")] = t.num
    return out


_sym_cache = {}


def _live_count(rt):
    """Coroutines spawned and not returned: the runtime counts them per P
    (loom__gcount), plus those spawned or ended without a P."""
    n = int(rt["nspawned_nop"]) - int(rt["nexited_nop"])
    for i in range(int(rt["nprocs"])):
        p = rt["allp"][i].dereference()
        n += int(p["nspawned"]) - int(p["nexited"])
    return max(n, 0)


def _sym(pc, is_return_address):
    key = (pc, is_return_address)
    if key not in _sym_cache:
        _sym_cache[key] = _sym_uncached(pc, is_return_address)
    return _sym_cache[key]


def _sym_uncached(pc, is_return_address):
    """'func at file.c:123' for a code address, or its hex.  A return
    address is looked up one byte back (in the call instruction); a
    function's entry names the line the function is defined on."""
    if pc == 0:
        return "-"
    look = pc - 1 if is_return_address else pc
    name = None
    func = None
    try:
        b = gdb.block_for_pc(look)
        while b is not None and b.function is None:
            b = b.superblock
        if b is not None:
            func = b.function
            name = func.print_name
    except RuntimeError:
        pass
    if name is None:
        try:
            s = gdb.execute("info symbol 0x%x" % look, to_string=True)
            if not s.startswith("No symbol"):
                name = s.split(" in section")[0].strip()
        except gdb.error:
            pass
    if name is None:
        return "0x%x" % pc
    if not is_return_address and func is not None and func.symtab:
        # A function's entry: where it is defined, not its first line.
        return "%s at %s:%d" % (name, func.symtab.filename.split("/")[-1],
                                func.line)
    sal = gdb.find_pc_line(look)
    if sal.symtab is not None and sal.line:
        return "%s at %s:%d" % (name, sal.symtab.filename.split("/")[-1],
                                sal.line)
    return name


def _read_string(addr, limit=64):
    if addr == 0:
        return ""
    try:
        return gdb.Value(addr).cast(
            gdb.lookup_type("char").pointer()).string(length=-1)[:limit]
    except (gdb.error, gdb.MemoryError, UnicodeDecodeError):
        return "0x%x" % addr


class _Snapshot(object):
    """Runtime, Gs, Ms and who runs what, read once per command."""

    def __init__(self):
        _sym_cache.clear()  # code may have been loaded since last time
        self.lay = _Layout()
        self.rt = _find_rt()
        self.gs = _all_gs(self.rt, self.lay)
        self.ms = _all_ms(self.rt)
        self.threads = _gdb_threads()
        self.m_of = {m.curg: m for m in self.ms if m.curg != m.g0}

    def find(self, gid):
        hits = [g for g in self.gs if g.id == gid]
        live = [g for g in hits if g.status != "idle"]
        return (live or hits or [None])[0]

    def thread_of(self, m):
        return self.threads.get(m.thread)

    def where_running(self, g):
        """(M, gdb thread number or None) if an M runs g, else None."""
        m = self.m_of.get(g.addr)
        if m is None:
            return None
        return m, self.thread_of(m)


def _parse_id(arg):
    try:
        return int(arg, 0)
    except ValueError:
        raise LoomError("loom: %r is not a coroutine id" % arg)


class LoomCoroutines(gdb.Command):
    """List the coroutines of the running loom runtime.

Usage: loom-coroutines [-a]   (also: info coroutines [-a])

One line per coroutine: id, status (runnable, running, waiting, dead),
why it waits (the wait reason it parked with), the gdb thread and loom M
running it, the function it runs, and where loom_go was called.  Free
(idle) coroutine slots are left out unless -a is given.  `*` marks the
coroutine running on the selected thread.  See also loom-bt."""

    def __init__(self, name):
        super(LoomCoroutines, self).__init__(name, gdb.COMMAND_STACK)

    def invoke(self, arg, from_tty):
        args = gdb.string_to_argv(arg)
        show_idle = False
        for a in args:
            if a in ("-a", "--all"):
                show_idle = True
            else:
                raise LoomError("usage: loom-coroutines [-a]")
        snap = _Snapshot()
        rt = snap.rt
        sel = gdb.selected_thread()
        sel_num = sel.num if sel is not None else None
        rows = []
        nidle = 0
        for g in sorted(snap.gs, key=lambda g: (g.id, g.addr)):
            if g.status == "idle" and not show_idle:
                nidle += 1
                continue
            reason = _read_string(g.wait_reason) if g.status == "waiting" else ""
            thread = ""
            mark = " "
            run = snap.where_running(g) if g.status == "running" else None
            if run is not None:
                m, tnum = run
                thread = "%s (M%d%s)" % (tnum if tnum is not None else
                                         "pthread 0x%x" % m.thread, m.id,
                                         ", P%d" % m.p if m.p is not None
                                         else "")
                if tnum is not None and tnum == sel_num:
                    mark = "*"
            elif g.status == "running":
                thread = "(switching out)"
            rows.append((mark, str(g.id), g.status, reason, thread,
                         _sym(g.fn, False), _sym(g.spawn_pc, True)))
        head = ("", "Id", "Status", "Reason", "Thread", "Function",
                "Spawned at")
        widths = [max(len(r[i]) for r in rows + [head])
                  for i in range(len(head) - 1)]
        gdb.write("loom runtime at 0x%x: %d procs, %d threads, %d live "
                  "coroutines\n" % (int(rt), int(rt["nprocs"]),
                                    len(snap.ms), _live_count(rt)))
        for r in [head] + rows:
            cols = [r[0].ljust(widths[0]), r[1].rjust(widths[1])]
            cols += [r[i].ljust(widths[i]) for i in range(2, len(widths))]
            gdb.write("  ".join(cols) + "  " + r[-1] + "\n")
        if nidle:
            gdb.write("(%d idle coroutine slot%s not shown; -a shows them)\n"
                      % (nidle, "" if nidle == 1 else "s"))


class LoomBt(gdb.Command):
    """Backtrace of one loom coroutine.

Usage: loom-bt ID [bt options, e.g. full or -frame-arguments all]
       loom-bt all[=N] [bt options]


For a parked coroutine (waiting or runnable), loads the registers it saved
when it switched out into frame 0 of the selected thread, runs `bt`, then
restores the thread's registers; the process must be live and stopped.
For a running coroutine, says which thread to switch to (`thread N`,
then `bt`).  IDs are those of loom-coroutines.  `all` shows every parked
coroutine in turn, or the first N (a hung program's whole picture, like a
Go goroutine dump; the tests' watchdogs print it)."""

    def __init__(self):
        super(LoomBt, self).__init__("loom-bt", gdb.COMMAND_STACK)

    def invoke(self, arg, from_tty):
        args = gdb.string_to_argv(arg)
        if not args:
            raise LoomError("usage: loom-bt ID|all [bt options]")
        if args[0] == "all" or args[0].startswith("all="):
            limit = None
            if args[0] != "all":
                try:
                    limit = int(args[0][4:])
                except ValueError:
                    raise LoomError("usage: loom-bt all[=N] [bt options]")
            self._all(limit, args[1:])
            return
        gid = _parse_id(args[0])
        snap = _Snapshot()
        g = snap.find(gid)
        if g is None:
            raise LoomError("loom: no coroutine %d" % gid)
        if g.status in ("idle", "dead"):
            raise LoomError("loom: coroutine %d is %s: it has no stack to "
                            "show" % (gid, g.status))
        if g.status == "running":
            run = snap.where_running(g)
            if run is not None:
                m, tnum = run
                sel = gdb.selected_thread()
                if tnum is not None and sel is not None and tnum == sel.num:
                    gdb.write("coroutine %d is running on the selected "
                              "thread %d (M%d); its backtrace is the "
                              "thread's:\n" % (gid, tnum, m.id))
                    gdb.execute("bt " + " ".join(args[1:]))
                    return
                where = ("thread %d" % tnum if tnum is not None else
                         "the thread with pthread_t 0x%x" % m.thread)
                gdb.write("coroutine %d is running on %s (M%d): switch to "
                          "it with `%s` and use `bt`.\n"
                          % (gid, where, m.id,
                             "thread %d" % tnum if tnum is not None
                             else "info threads"))
                return
            # No M runs it: it is between its switch and its post-switch
            # action, so its saved frame is already complete.
        self._parked_bt(snap, g, args[1:])

    def _all(self, limit, bt_args):
        snap = _Snapshot()
        parked = [g for g in sorted(snap.gs, key=lambda g: (g.id, g.addr))
                  if g.status in ("waiting", "runnable")]
        if limit is not None and len(parked) > limit:
            gdb.write("(%d parked coroutines; the first %d follow)\n"
                      % (len(parked), limit))
            parked = parked[:limit]
        for g in parked:
            try:
                self._parked_bt(snap, g, bt_args)
            except LoomError as e:
                gdb.write("%s\n" % e)
            gdb.write("\n")

    def _parked_bt(self, snap, g, bt_args):
        inf = gdb.selected_inferior()
        lo, hi = g.stk_base, g.addr
        if not (lo <= g.sp and g.sp + _FRAME_SIZE <= hi):
            raise LoomError("loom: coroutine %d: saved sp 0x%x is outside "
                            "its stack [0x%x, 0x%x)" % (g.id, g.sp, lo, hi))
        try:
            frame = bytes(inf.read_memory(g.sp, _FRAME_SIZE))
        except gdb.MemoryError:
            raise LoomError("loom: coroutine %d: cannot read its saved "
                            "frame at 0x%x" % (g.id, g.sp))
        ret = _u(frame, _FRAME_RET, 8)
        try:
            tramp = int(gdb.parse_and_eval("&loom__ctx_trampoline"))
        except gdb.error:
            tramp = None
        if ret == tramp:
            gdb.write("coroutine %d has not started yet; it will run %s\n"
                      % (g.id, _sym(g.fn, False)))
            return
        new = {"rsp": g.sp + _FRAME_SIZE, "rip": ret}
        for reg, off in _FRAME:
            new[reg] = _u(frame, off, 8)

        thread = gdb.selected_thread()
        if thread is None or not thread.is_stopped():
            raise LoomError("loom: loom-bt needs a stopped thread to borrow "
                            "(select one with `thread N`)")
        try:
            level = gdb.selected_frame().level()
        except gdb.error:
            level = 0
        gdb.newest_frame().select()
        f0 = gdb.newest_frame()
        saved = {r: int(f0.read_register(r)) for r in _SAVE_REGS}
        gdb.write("coroutine %d (%s%s), borrowing thread %d's registers:\n"
                  % (g.id, g.status,
                     ": " + _read_string(g.wait_reason)
                     if g.status == "waiting" and g.wait_reason else "",
                     thread.num))
        try:
            try:
                for r in _SAVE_REGS:
                    gdb.execute("set var $%s = %d" % (r, new[r]),
                                to_string=True)
            except gdb.error as e:
                raise LoomError("loom: cannot set registers (%s); loom-bt "
                                "needs a live process, not a core file" % e)
            gdb.execute("bt " + " ".join(bt_args))
        finally:
            for r in _SAVE_REGS:
                try:
                    gdb.execute("set var $%s = %d" % (r, saved[r]),
                                to_string=True)
                except gdb.error:
                    pass
            try:
                gdb.execute("frame %d" % level, to_string=True)
            except gdb.error:
                pass


LoomCoroutines("loom-coroutines")
LoomCoroutines("info coroutines")
LoomBt()
