"""Precompiled torch headers for extension builds (sandbox/precompiled.py says which builds may
use one): made by the header precompiler (sandbox/pch.py), which runs no candidate code, in a
sandbox of its own, and copied into the cache by this process, the only one that writes there.

A search asks for the headers of the flag sets its builds found without one; each is made once
(about 30 CPU seconds at the lowest priority, in the background, while the search goes on) and
serves every later build on this machine. A one-shot verification only uses the headers there
are.
"""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path
from typing import Callable

from evo.devices import install_whole
from evo.sandbox import precompiled
from evo.sandbox_runner import SandboxFailure, SandboxProcess

KEY = re.compile(r"[0-9a-f]{24}")
PROMPT_FORMAT_SPEC = precompiled.spec(True, [])


class PrecompiledHeaders:
    def __init__(self, root: Path, start: Callable[[], SandboxProcess], release: Callable[[SandboxProcess], None],
                 timeout_s: float, make_new: bool):
        self.root = root  # cache directory of the headers, one directory per key
        self.start, self.release, self.timeout_s = start, release, timeout_s
        self.make_new = make_new  # False: use the headers there are, make none
        self.asked: list[dict] = []  # specifications asked for in this session, each made at most once
        self.queue: list[dict] = []
        self.replies: list[dict] = []  # the precompiler's replies, in order
        self.lock = threading.Lock()
        self.closing = threading.Event()
        self.current: SandboxProcess | None = None
        self.thread: threading.Thread | None = None

    def want(self, specs: object) -> None:
        """Make the headers of these specifications (from a build sandbox: checked here) unless
        they were asked for already."""
        if not self.make_new or not isinstance(specs, list):
            return
        with self.lock:
            for raw in specs[: precompiled.MAX_SPECS]:
                spec = precompiled.checked(raw)
                if spec is not None and spec not in self.asked and len(self.asked) < precompiled.MAX_SPECS:
                    self.asked.append(spec)
                    self.queue.append(spec)
            if self.queue and (self.thread is None or not self.thread.is_alive()) and not self.closing.is_set():
                self.thread = threading.Thread(target=self.work, name="evo-header-precompiler", daemon=True)
                self.thread.start()

    def want_prompt_format(self) -> None:
        """Make the header of the prompts' load_inline format for CUDA (prompts/parts/
        format_load_inline.md: no C++ flags of its own) before any build asks for it: a search's
        first candidates, written by the LLM meanwhile, then build with it."""
        self.want([PROMPT_FORMAT_SPEC])

    def work(self) -> None:
        while not self.closing.is_set():
            with self.lock:
                if not self.queue:
                    return
                spec = self.queue.pop(0)
            self.make(spec)

    def make(self, spec: dict) -> None:
        try:
            process = self.current = self.start()
        except (SandboxFailure, OSError) as err:
            self.replies.append({"ok": False, "error": str(err)})
            return
        try:
            reply, _ = process.request({"spec": spec, "headers": str(self.root), "out": str(process.workdir / "header")},
                                       timeout=self.timeout_s)
            if reply.get("ok") and reply.get("built") and not self.closing.is_set():
                self.install(str(reply.get("key")), process.workdir / "header")
        except SandboxFailure as failure:
            reply = {"ok": False, "error": str(failure)}
        finally:
            self.current = None
            self.release(process)
        self.replies.append(reply)

    def install(self, key: str, made: Path) -> None:
        """Into the cache under its key, whole or not at all: a build never sees half a header."""
        if not KEY.fullmatch(key):
            return

        def copy(staging: Path) -> None:
            staging.mkdir(parents=True)
            for name in (precompiled.HEADER, precompiled.HEADER + ".gch"):
                shutil.copyfile(made / name, staging / name)
        install_whole(self.root / key, copy)

    def close(self) -> None:
        self.closing.set()
        process = self.current
        if process is not None:
            process.stop()
        if self.thread is not None:
            self.thread.join()
