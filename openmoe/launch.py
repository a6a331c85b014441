"""`colossalai run` with what it lacks for unattended jobs: signal forwarding, no orphans, no secrets in the log.

    python -m openmoe.launch --nproc_per_node 2 [--hostfile H --master_addr A] [--master_port P] train.py [options]

(train.sh runs exactly this.) The arguments are colossalai run's, unchanged. On top of it:
- Signals: SIGTERM/SIGINT/SIGHUP to this process (a scheduler's preemption, Ctrl-C, `kill` of train.sh) are sent on
  as SIGTERM/SIGINT to the training ranks, i.e. the processes torchrun started on this node, which finish their step,
  save a checkpoint and exit (train.py --preempt_grace_s); colossalai run and torchrun then end on their own. Sent to
  colossalai run itself, a SIGTERM would kill it and leave torchrun and the ranks running as orphans. Ranks on other
  hosts of a hostfile run are reached only through their ssh sessions (not forwarded).
- No orphans: this process is a child subreaper (Linux prctl), so processes whose parent died are reparented to it;
  once colossalai run has exited, whatever is left of the tree gets until the grace period (+30 s) and is then
  killed.
- No secrets: when a node fails, colossalai run prints its command with `export K="V"` for every environment
  variable. Every line of its output passes a filter that replaces the values of variables with a name part such as
  TOKEN, KEY, SECRET, PASSWORD or CREDENTIALS (HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, ...) by *** wherever
  they appear, and shortens that export list to a count. Paths are not secrets: PWD/OLDPWD (whose name part PWD
  otherwise marks a password, as in MYSQL_PWD) and any value that is an existing absolute directory stay visible.
- Arguments arrive as typed: colossalai run joins the script's arguments with spaces into one shell command line,
  so each is shell-quoted here (a --system_prompt "Be brief.", an empty value, quotes or $ reach train.py intact).
- Failing fast: a node that cannot be started (ssh refused, host down) is named in one line as soon as colossalai
  run reports it, and the nodes that did start stop waiting for it after the rendezvous timeout: PET_RDZV_CONF
  (torchrun's --rdzv_conf from the environment, exported to every node) defaults to timeout=60 here instead of
  torchrun's 600 s (plus its other waits: a hostfile run with one dead host used to hang about 15 minutes).
- One line instead of a wall: torchrun's own traceback (ChildFailedError) with its failure report, and colossalai
  run's failure block (the command, "Stdout: already printed", ...), are each summarised in one line; the ranks'
  own messages and tracebacks pass unchanged. OPENMOE_DEBUG=1 shows everything (still redacted). The scripts' own
  command-line mistakes are one line per rank too (OneLineErrorParser, which train.py and infer.py parse with).
Exit code: colossalai run's, or 128 + the signal number when stopped by a signal.
"""

from __future__ import annotations

import argparse
import ctypes
import difflib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil

# a name part (between underscores) like these marks a secret: HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY,
# DB_PASSWORD; not TOKENIZERS_PARALLELISM (whose value "false" would otherwise be masked everywhere)
SECRET_PART = re.compile(r"TOKEN|KEY|APIKEY|SECRET|PASSWORD|PASSWD|PASS|PWD|CREDENTIALS?|AUTH", re.IGNORECASE)
NOT_SECRET_VALUES = {"true", "false", "none", "null", "yes", "no", "0", "1"}
# the shell's working directories: PWD as a name part marks a password (MYSQL_PWD), but these hold the path that
# prefixes every absolute path in the log
NOT_SECRET_NAMES = {"PWD", "OLDPWD"}
EXPORTS = re.compile(r'export (?:[A-Za-z_][A-Za-z0-9_]*="[^"\n]*"\s*)+')
DEFAULT_GRACE_S = 120.0  # train.py's --preempt_grace_s default (openmoe/train/config.py)
DEFAULT_RDZV_CONF = "timeout=60"
# colossalai run's line for a node whose command could not run: "... on HOST, is localhost: False, exception: E"
NODE_FAILED = re.compile(r"on (\S+), is localhost: (?:True|False), exception: (.*)")
AFTER_GRACE_S = 30.0
PR_SET_CHILD_SUBREAPER = 36


def is_secret_name(name: str) -> bool:
    return name not in NOT_SECRET_NAMES and any(SECRET_PART.fullmatch(part) for part in name.split("_"))


def is_directory_path(value: str) -> bool:
    """An existing absolute directory (HF_TOKEN_PATH's parent, a KEY_DIR): no credential, and masking it would
    mask every path beneath it."""
    return os.path.isabs(value) and os.path.isdir(value)


def secret_values(env: dict[str, str]) -> list[str]:
    """Values to hide: those of variables named like secrets (4+ characters and not a boolean word: shorter ones
    would mask ordinary text; not a directory path), longest first so that a value containing another is hidden
    whole."""
    values = {v for k, v in env.items() if is_secret_name(k) and len(v) >= 4
              and v.lower() not in NOT_SECRET_VALUES and not is_directory_path(v)}
    return sorted(values, key=len, reverse=True)


def redact(line: str, secrets: list[str]) -> str:
    for value in secrets:
        line = line.replace(value, "***")
    return EXPORTS.sub(lambda m: f"export <{m.group(0).count('=')} environment variables> ", line)


class Summarizer:
    """A line filter that replaces torchrun's ChildFailedError traceback + failure report, and colossalai run's
    failure block, by one line each; every other line passes unchanged (in order). feed(line) -> lines to print."""

    RULE = "=" * 60
    MAX_HELD = 200  # a block longer than this is not one of the two: print it as it was

    def __init__(self):
        self.held: list[str] = []
        self.state = "pass"  # pass | traceback | report | colossal

    def feed(self, line: str) -> list[str]:
        if self.state == "pass":
            if line.rstrip("\n") == "Traceback (most recent call last):":
                self.state, self.held = "traceback", [line]
                return []
            failed = NODE_FAILED.search(line)
            if line.startswith("Error: failed to run ") and failed and "bad command exit code" in failed.group(2):
                self.state, self.held = "colossal", [line]
                return [f"colossalai run: node {failed.group(1)} failed (the ranks' errors are above)\n"]
            return [line]
        self.held.append(line)
        if len(self.held) > self.MAX_HELD:
            return self._release()
        if self.state == "traceback" and not line.startswith((" ", "\t")):  # the exception line ends a traceback
            frames = "".join(self.held)
            if "ChildFailedError" in line and "torch/distributed/run.py" in frames:
                self.state, self.held = "report", []
                return []
            return self._release()
        if self.state == "report" and line.rstrip("\n") == self.RULE and len(self.held) > 1:
            return [self._report_line()]
        if self.state == "colossal" and line.startswith("Stderr:"):
            self.state, self.held = "pass", []
        return []

    def _report_line(self) -> str:
        ranks, codes = [], []
        for held in self.held:
            key, _, value = held.partition(":")
            if key.strip() == "rank":
                ranks.append(value.split()[0])
            elif key.strip() == "exitcode":
                codes.append(value.split()[0])
        self.state, self.held = "pass", []
        failures = ", ".join(f"rank {r} exit code {c}" for r, c in zip(ranks, codes))
        return f"torchrun: {failures or 'ranks failed'} (OPENMOE_DEBUG=1 shows torchrun's full report)\n"

    def _release(self) -> list[str]:
        held, self.state, self.held = self.held, "pass", []
        return held

    def flush(self) -> list[str]:
        return self._release()


# After Ctrl-C or a preemption signal, what the interrupted processes print on their way out: Python tracebacks (every
# rank at once, interleaved, e.g. a KeyboardInterrupt inside an import during startup), torchrun's worker logging and
# failure report. The ranks' own lines ("[rank R] preempted (SIGINT): saved ...") and colossalai run's summary pass.
INTERRUPT_NOISE = re.compile(r"(Traceback \(most recent call last\):|[ \t]|During handling of the above exception|"
                             r"The above exception was the direct cause|[A-Za-z_][\w.]*(Error|Exception|Interrupt|"
                             r"NotAvailable)\b|[WEI]\d{4} \d\d:\d\d:\d\d|=+$|-+$|train\.py FAILED|Failures:|"
                             r"Root Cause|\[\d+\]:|<NO_OTHER_FAILURES>|$)")


def _pump(src, dst, secrets: list[str], interrupted: threading.Event | None = None) -> None:
    """Copy src to dst line by line, redacted and summarised; once `interrupted` is set, INTERRUPT_NOISE is dropped
    (the launcher then ends with one line naming the signal). OPENMOE_DEBUG=1: every line, redacted."""
    debug = bool(os.environ.get("OPENMOE_DEBUG"))
    summary = None if debug else Summarizer()
    for raw in iter(src.readline, ""):
        line = redact(raw, secrets)
        if interrupted is not None and interrupted.is_set() and not debug and INTERRUPT_NOISE.match(line):
            continue
        for out in summary.feed(line) if summary is not None else [line]:
            dst.write(out)
        failed = NODE_FAILED.search(line)
        if failed and "bad command exit code" not in failed.group(2):  # not started at all (ssh), not a rank error
            dst.write(f"openmoe.launch: error: node {failed.group(1)} could not be started: {failed.group(2)}; "
                      f"the other nodes give up at the rendezvous timeout "
                      f"(PET_RDZV_CONF={os.environ.get('PET_RDZV_CONF')})\n")
        dst.flush()
    for out in summary.flush() if summary is not None else []:
        dst.write(out)
    dst.flush()
    src.close()


# colossalai run's options that take a value (colossalai/cli/launcher/__init__.py); its first other argument is the
# script, and everything from there on goes into the shell command line
VALUE_OPTIONS = {"-H", "-host", "--host", "--hostfile", "--include", "--exclude", "--num_nodes", "--nproc_per_node",
                 "--master_port", "--master_addr", "--extra_launch_args", "--ssh-port", "-m"}


def quote_script_args(args: list[str]) -> list[str]:
    """colossalai run's arguments with the script (or -m's module) and its arguments shell-quoted: colossalai run
    parses its own options itself, then runs `torchrun ... SCRIPT ARGS` joined by spaces through a shell (locally
    and over ssh), which would split "Be brief." in two and drop an empty value."""
    out, i = list(args), 0
    while i < len(out):
        arg = out[i]
        if arg == "-m" and i + 1 < len(out):
            out[i + 1:] = [shlex.quote(a) for a in out[i + 1:]]
            break
        if arg in VALUE_OPTIONS:
            i += 2
        elif arg.startswith("-"):  # --option=value, or a flag such as --help
            i += 1
        else:
            out[i:] = [shlex.quote(a) for a in out[i:]]
            break
    return out


def _grace_s(args: list[str]) -> float:
    for i, arg in enumerate(args):
        if arg == "--preempt_grace_s" and i + 1 < len(args):
            return float(args[i + 1])
        if arg.startswith("--preempt_grace_s="):
            return float(arg.split("=", 1)[1])
    return DEFAULT_GRACE_S


def _is_torchrun(proc: psutil.Process | None) -> bool:
    try:
        cmd = proc.cmdline() if proc is not None else []
    except psutil.Error:
        return False
    return any(part.endswith("torchrun") or part == "torch.distributed.run" for part in cmd[:3])


def training_ranks() -> list[psutil.Process]:
    """The processes torchrun started, among this process's descendants (orphans included: we are a subreaper)."""
    ranks = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if _is_torchrun(proc.parent()):
                ranks.append(proc)
        except psutil.Error:
            continue
    return ranks


class Launcher:
    def __init__(self, args: list[str]):
        self.args, self.grace_s = args, _grace_s(args)
        self.signum = 0
        self.interrupted = threading.Event()  # set by the first signal: the pumps drop INTERRUPT_NOISE from then on
        self.deadline: float | None = None

    def run(self) -> int:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: orphans are then not collected
            pass
        exe = shutil.which("colossalai") or os.path.join(os.path.dirname(sys.executable), "colossalai")
        secrets = secret_values(dict(os.environ))
        os.environ.setdefault("PET_RDZV_CONF", DEFAULT_RDZV_CONF)
        # its own session: a terminal's Ctrl-C reaches only this process, which forwards it to the ranks alone
        child = subprocess.Popen([exe, "run", *quote_script_args(self.args)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True)
        pumps = [threading.Thread(target=_pump, args=(src, dst, secrets, self.interrupted), daemon=True)
                 for src, dst in ((child.stdout, sys.stdout), (child.stderr, sys.stderr))]
        for t in pumps:
            t.start()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        code = self._wait(child)
        for t in pumps:
            t.join(timeout=5)
        self._collect_orphans()
        if self.signum:
            print(f"openmoe.launch: stopped by {signal.Signals(self.signum).name} (colossalai run exited {code})",
                  file=sys.stderr, flush=True)
            return 128 + self.signum
        return code

    def _on_signal(self, signum, frame) -> None:
        if not self.signum:
            self.signum = signum
            self.deadline = time.monotonic() + self.grace_s + AFTER_GRACE_S
            self.interrupted.set()
        forward = signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM
        for proc in training_ranks():
            try:
                proc.send_signal(forward)
            except psutil.Error:
                pass

    def _wait(self, child: subprocess.Popen) -> int:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._kill_tree()

    def _collect_orphans(self) -> None:
        """Wait for what is left of the tree (ranks still saving after colossalai run died), then kill it."""
        deadline = self.deadline if self.deadline is not None else time.monotonic() + AFTER_GRACE_S
        while psutil.Process().children(recursive=True):
            self._reap()
            if time.monotonic() > deadline:
                self._kill_tree()
                self._reap()
                break
            time.sleep(0.2)

    @staticmethod
    def _reap() -> None:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass

    @staticmethod
    def _kill_tree() -> None:
        for proc in psutil.Process().children(recursive=True):
            try:
                proc.kill()
            except psutil.Error:
                pass


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse whose errors are one line (its own message, which names the value and the choices, plus the closest
    option for an unknown one) instead of the whole usage text: under the launcher every rank prints it, and a typo
    cost ~120 lines per rank. Exit code 2, as argparse's. `synonyms`: other tools' names for our options
    (--learning_rate -> --lr), suggested where spelling alone would not find them."""

    def __init__(self, *args, synonyms: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.synonyms = synonyms or {}

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            message += self._closest(message.split(": ", 1)[1].split())
        self.exit(2, f"{self.prog}: error: {message}; see python {self.prog} --help\n")

    def _closest(self, unknown: list[str]) -> str:
        options = [o for action in self._actions for o in action.option_strings]
        found = []
        for arg in unknown:
            name = arg.split("=", 1)[0]
            if not re.match(r"--?[A-Za-z]", name):
                continue  # a value, not an option
            # cutoff 0.75: close enough for a typo (--batchsize, --max_step) without far guesses (--lean_zero)
            close = [self.synonyms[name]] if name in self.synonyms else difflib.get_close_matches(name, options, 1,
                                                                                                  0.75)
            if close:
                found.append((name, close[0]))
        if not found:
            return ""
        if len(found) == 1:
            return f" (did you mean {found[0][1]}?)"
        return " (did you mean " + ", ".join(f"{ours} for {theirs}" for theirs, ours in found) + "?)"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[2].strip())
        return 2 if not args else 0
    return Launcher(args).run()


if __name__ == "__main__":
    sys.exit(main())
