"""`python sandbox_exec.py SPEC.json COMMAND...`: run COMMAND under the seccomp filters a
systemd unit asks for (SPEC written by `tests/system.py: unit_sandbox`), built with
libseccomp as systemd builds them:

- only the allowed system calls; the others fail with the unit's errno;
- `socket()` only for the allowed address families (others: EAFNOSUPPORT);
- no memory both writable and executable, none made executable later;
- no setuid or setgid bit set by chmod.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import stat
import sys
from pathlib import Path

ALLOW = 0x7FFF0000
MASKED_EQ, EQ, GE = 7, 4, 5
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000


def errno_action(number: int) -> int:
    return 0x00050000 | (number & 0xFFFF)


class Compare(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Compare),
]  # fmt: skip
lib.seccomp_load.argtypes = [ctypes.c_void_p]


def number(name: str) -> int | None:
    nr: int = lib.seccomp_syscall_resolve_name(name.encode())
    return nr if nr >= 0 else None  # not a system call of this architecture


def rule(ctx: int, action: int, name: str, *compares: tuple[int, int, int, int]) -> None:
    nr = number(name)
    if nr is None:
        return
    array = (Compare * max(len(compares), 1))(*(Compare(*c) for c in compares))
    result = lib.seccomp_rule_add_array(ctx, action, nr, len(compares), array)
    if result < 0:
        raise OSError(-result, f"seccomp rule for {name}")


def load(ctx: int) -> None:
    result = lib.seccomp_load(ctx)
    if result < 0:
        raise OSError(-result, "seccomp_load")


def main(spec_path: str, command: list[str]) -> None:
    spec = json.loads(Path(spec_path).read_text())
    denied = errno_action(getattr(errno, spec["errno"]))
    allow_list = lib.seccomp_init(denied)  # SystemCallFilter=
    for name in spec["allowed"]:
        rule(allow_list, ALLOW, name)
    restrictions = lib.seccomp_init(ALLOW)  # the unit's finer rules, stacked on it
    families = {getattr(socket, family) for family in spec["families"]}
    for family in range(64):  # RestrictAddressFamilies=
        if family not in families:
            rule(restrictions, errno_action(errno.EAFNOSUPPORT), "socket", (0, EQ, family, 0))
    rule(restrictions, errno_action(errno.EAFNOSUPPORT), "socket", (0, GE, 64, 0))
    if spec["deny_write_execute"]:  # MemoryDenyWriteExecute=
        both = PROT_WRITE | PROT_EXEC
        rule(restrictions, errno_action(errno.EPERM), "mmap", (2, MASKED_EQ, both, both))
        for name in ("mprotect", "pkey_mprotect"):
            rule(
                restrictions, errno_action(errno.EPERM), name, (2, MASKED_EQ, PROT_EXEC, PROT_EXEC)
            )
        rule(restrictions, errno_action(errno.EPERM), "shmat", (2, MASKED_EQ, SHM_EXEC, SHM_EXEC))
    if spec["deny_suid_sgid"]:  # RestrictSUIDSGID=
        for bit in (stat.S_ISUID, stat.S_ISGID):
            for name, arg in (("chmod", 1), ("fchmod", 1), ("fchmodat", 2)):
                rule(restrictions, errno_action(errno.EPERM), name, (arg, MASKED_EQ, bit, bit))
    os.umask(spec["umask"])  # UMask=
    load(restrictions)  # libseccomp sets no_new_privs first, as NoNewPrivileges= does
    load(allow_list)  # last: it forbids seccomp() itself
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
