"""Where and as whom a replica runs.

A gateway running as root never runs function code as root: replicas run as the function user
(`--function-user`; default `openfx-fn` when that user exists, made by scripts/function-user,
else `nobody`; "" keeps the gateway's own user). The gateway's run dir is root-only, so each
replica gets a folder of its own under a shared one the function user can traverse but not list:
its sockets and lock file (the gateway reaches them as root), a private TMPDIR emptied at every
start, and a private HOME kept across restarts (Java, Spark and ivy write caches there). The
replica's environment is the gateway's minus its secrets (tokens), plus those folders.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pwd
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from openfx.procgroup import alive

DEFAULT_USER = "openfx-fn"
FALLBACK_USER = "nobody"


# Runs between fork and the watcher's exec, as the gateway's user: joins the replica's cgroups,
# drops to the function user (no supplementary groups), then execs the watcher. The event loop's
# subprocess support (uvloop) has no user=/group=, and preexec_fn is not safe in a process with
# threads (grpc's), so this is a separate interpreter: -I -S ignores PYTHON* variables, user site
# and .pth files, so nothing from the function's environment runs before the drop.
_TRAMPOLINE = """
import os, sys
uid, gid, procs, *argv = sys.argv[1:]
try:
    for path in filter(None, procs.split("\\n")):
        with open(path, "w") as f:
            f.write(str(os.getpid()))
    if uid != "-":
        os.setgroups([])
        os.setgid(int(gid))
        os.setuid(int(uid))
    os.execv(argv[0], argv)
except OSError as e:
    print(f"cannot start the watcher: {e}", file=sys.stderr)
    os._exit(126)
"""


@dataclass(frozen=True)
class FunctionUser:
    name: str
    uid: int
    gid: int


def command(argv: list[str], user: FunctionUser | None, cgroup_procs: list[str]) -> list[str]:
    """`argv`, run as `user` inside the cgroups whose cgroup.procs files are given."""
    if user is None and not cgroup_procs:
        return argv
    uid, gid = (str(user.uid), str(user.gid)) if user else ("-", "-")
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, uid, gid, "\n".join(cgroup_procs), *argv]


def _account(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ValueError(
            f"function user {name!r} does not exist (scripts/function-user makes openfx-fn)"
        ) from None


def function_user(setting: str | None) -> FunctionUser | None:
    """The user replicas run as, or None for the gateway's own (always None unless root).
    ValueError for a named user that does not exist, root or not: a typo must not pass unseen."""
    if setting == "":
        return None
    if setting is not None:
        _account(setting)
    if os.geteuid() != 0:
        return None
    name = setting
    if name is None:
        try:
            pwd.getpwnam(DEFAULT_USER)
            name = DEFAULT_USER
        except KeyError:
            name = FALLBACK_USER
    entry = _account(name)
    if entry.pw_uid == 0:
        return None
    return FunctionUser(name, entry.pw_uid, entry.pw_gid)


async def _failure_as(user: FunctionUser | None, argv: list[str]) -> str:
    """Run `argv` as `user` (None: ours): "" if it succeeds, else the last line it printed (or its
    exit code)."""
    process = await asyncio.create_subprocess_exec(
        *command(argv, user, []),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd="/",
    )
    _, err = await process.communicate()
    if process.returncode == 0:
        return ""
    lines = err.decode("utf-8", "replace").strip().splitlines() or [f"exit code {process.returncode}"]
    return lines[-1][:300]


async def check_interpreter(user: FunctionUser) -> str:
    """ "" when `user` can start a watcher with this interpreter, else why not (one line)."""
    failure = await _failure_as(user, [sys.executable, "-c", "import openfx.watcher.server"])
    return failure and (
        f"function user {user.name} cannot run {sys.executable}: {failure} "
        "(run scripts/function-user as root, or start the gateway with --function-user '')"
    )


# What a replica needs of its source, tried by whoever runs it (-I -S: nothing of the folder runs):
# the folder listable (its cwd, on sys.path) and the handler file readable. One line on stderr.
_SOURCE_PROBE = """
import os, sys
folder, name = sys.argv[1:]
handler = os.path.join(folder, name)
def fail(why):
    print(why, file=sys.stderr)
    sys.exit(1)
def denied(path, e):
    fail(f"cannot read {path}: {e.strerror}" if e.errno == 13 else f"{path}: {e.strerror}")
try:
    os.stat(folder)
except FileNotFoundError:
    fail(f"source folder {folder} does not exist")
except OSError as e:
    denied(folder, e)
if not os.path.isdir(folder):
    fail(f"source {folder} is not a folder")
try:
    os.listdir(folder)
except OSError as e:
    denied(folder, e)
if not os.path.isfile(handler):
    fail(f"handler file {name} not found in the source folder {folder}")
try:
    open(handler, "rb").close()
except OSError as e:
    denied(handler, e)
"""


async def check_source(user: FunctionUser | None, folder: Path, handler_file: str) -> str:
    """ "" when whoever runs the replicas (`user`, or the gateway's own user for None) can list
    `folder` and read `handler_file` in it, else why not (one line). The same probe for both: a
    folder under a private home (/root is 0700) must be refused at deploy, not crash-loop."""
    failure = await _failure_as(
        user, [sys.executable, "-I", "-S", "-c", _SOURCE_PROBE, str(folder), handler_file]
    )
    if not failure.startswith("cannot read ") or user is None:
        return failure
    return (
        f"function user {user.name} {failure} "
        f"(let it read the folder, e.g. setfacl -R -m u:{user.name}:rX plus x on the folders above, "
        "or deploy from a readable folder)"
    )


class ReplicaDirs:
    """A replica's folder: w.sock, w.grpc.sock, w.lock, tmp/ (fresh each start), home/."""

    def __init__(self, root: Path, name: str, user: FunctionUser | None) -> None:
        self.path = root / name
        self.user = user
        self.tmp = self.path / "tmp"
        self.home = self.path / "home"
        self.framed_socket = str(self.path / "w.sock")
        self.grpc_address = f"unix:{self.path / 'w.grpc.sock'}"
        self.lock_file = str(self.path / "w.lock")

    @property
    def owners(self) -> frozenset[int]:
        """Who may own the files the replica writes here (its ready and failure files)."""
        return frozenset({self.user.uid if self.user is not None else os.geteuid()})

    def prepare(self) -> None:
        """The folder (in a root-owned parent its function cannot write) and, inside it, tmp/ made
        afresh and home/ kept. Both are in a folder the function owns, so it may have put a symlink
        or a file in their place: a root gateway that chowned through it would hand the function
        whatever the link names (/etc). So nothing here follows a link: rmtree does not, anything
        but a real folder is removed, and the owner is set on a descriptor opened with O_NOFOLLOW."""
        self.path.mkdir(mode=0o700, exist_ok=True)
        if self.user is not None:
            os.lchown(self.path, self.user.uid, self.user.gid)
        shutil.rmtree(self.tmp, ignore_errors=True)  # a file or a link is left, for the loop below
        for folder in (self.tmp, self.home):
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                folder.unlink()
            folder.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if self.user is not None:
                    os.fchown(fd, self.user.uid, self.user.gid)
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def environment(self) -> dict[str, str]:
        env = {"TMPDIR": str(self.tmp)}
        if self.user is not None:
            env.update(HOME=str(self.home), USER=self.user.name, LOGNAME=self.user.name)
        return env


def replicas_root(run_dir: Path, user: FunctionUser | None) -> Path:
    """The folder replica folders go in: the gateway's run dir, or (switching user) a new one
    others may traverse but not list, since the run dir is the gateway's alone."""
    if user is None:
        return run_dir
    root = temp_folder("fn")
    root.chmod(0o711)
    return root


_TEMP = re.compile(r"openfx-(gw|fn)-(\d+)-\w+")
_LOCK = ".in-use"
_held: dict[Path, int] = {}  # this gateway's folders and their lock descriptors
_swept = False


def temp_folder(kind: str) -> Path:
    """A new folder in the system's temp dir, named after this gateway's pid and locked (flock)
    while it runs. A SIGKILLed gateway cannot remove its folders (its replicas' temp files
    included), so every gateway first removes those of its own user that no gateway holds: the pid
    is not running here and the lock is free (the lock also covers a gateway in another pid
    namespace sharing /tmp). Nothing else piles up in /tmp over restarts."""
    global _swept
    base = Path(tempfile.gettempdir())
    if not _swept:  # once per process: the gateway makes two of these at start
        _swept = True
        try:
            entries = list(base.iterdir())
        except OSError:  # a temp dir we may write but not list: nothing to clear
            entries = []
        for entry in entries:
            match = _TEMP.fullmatch(entry.name)
            if match is not None and not alive(int(match.group(2))):
                _remove_if_abandoned(entry)
    folder = Path(tempfile.mkdtemp(prefix=f"openfx-{kind}-{os.getpid()}-", dir=base))
    fd = os.open(folder / _LOCK, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _held[folder] = fd
    return folder


def remove_temp_folder(folder: Path) -> None:
    """Remove one of this gateway's folders and let go of its lock."""
    shutil.rmtree(folder, ignore_errors=True)
    fd = _held.pop(folder, None)
    if fd is not None:
        os.close(fd)


def _remove_if_abandoned(entry: Path) -> None:
    """Remove `entry` if it is a real folder of this user (never a link, never another's) whose
    lock nobody holds."""
    try:
        info = entry.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
            return
        fd = os.open(entry / _LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:  # no lock file: a gateway that died before taking it
        shutil.rmtree(entry, ignore_errors=True)
        return
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held: a live gateway this process cannot see
        return
    finally:
        os.close(fd)
    shutil.rmtree(entry, ignore_errors=True)


def base_environment() -> dict[str, str]:
    """The gateway's environment without what a function must not see (its tokens)."""
    return {k: v for k, v in os.environ.items() if not (k.startswith("OPENFX_") and "TOKEN" in k)}
