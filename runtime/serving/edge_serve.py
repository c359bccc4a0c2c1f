"""``edge-serve REPO``: start NVIDIA Triton Inference Server on a model repository (written by ``export-engine
--triton-repo``), wait until it is ready, print the endpoints, stop it cleanly on Ctrl-C / SIGTERM.

It launches Triton (the ``tritonserver`` that the ``nvidia-pytriton`` wheel ships, or one on PATH); it serves
nothing itself."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request

from ..commands import EXIT_OK, EXIT_TERMINATED, run_cli
from ..errors import ClipadError, Terminated

log = logging.getLogger("clipad")
EPILOG = """\
examples:
  export-engine --from-onnx crane_l14 --triton-repo models --triton-backend python
  edge-serve models                                     # HTTP 8000, gRPC 8001, metrics 8002
  edge-detect --triton localhost:8000 --triton-model crane_l14 --source line3/ --jsonl r.jsonl
  curl localhost:8000/v2/health/ready; curl localhost:8002/metrics

Python-backend models (NAME_pre, NAME_post, the python flavor) run clipad-edge inside Triton's Python stub, which
uses this environment's packages. The stub of nvidia-pytriton 0.7 needs numpy<2: install clipad-edge[serve] in its
own environment (pip resolves numpy<2 there). Exit status: 0 after Ctrl-C, 143 after SIGTERM (both stop Triton
cleanly first), 2 with one line when the server cannot start or dies (its log is kept and named).
"""


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="edge-serve", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 description="Serve a Triton model repository written by export-engine "
                                             "--triton-repo on NVIDIA Triton Inference Server.", epilog=EPILOG)
    ap.add_argument("repo", metavar="REPO", help="the Triton model repository")
    ap.add_argument("--http-port", type=int, default=8000, metavar="P")
    ap.add_argument("--grpc-port", type=int, default=8001, metavar="Q")
    ap.add_argument("--metrics-port", type=int, default=8002, metavar="R")
    ap.add_argument("--tritonserver", metavar="PATH", help="this tritonserver binary (default: nvidia-pytriton's, "
                                                           "else tritonserver on PATH)")
    ap.add_argument("--ready-timeout", type=float, default=180.0, metavar="S",
                    help="give up when the server is not ready after S seconds (default 180)")
    ap.add_argument("--log-verbose", type=int, default=0, metavar="N", help="Triton's --log-verbose level")
    ap.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return ap.parse_args(argv)


class Server:
    """A tritonserver process on a repository; ``start`` returns when it is ready."""

    def __init__(self, repo: str, http_port: int, grpc_port: int, metrics_port: int,
                 binary: str | None = None, log_verbose: int = 0):
        self.repo = os.path.abspath(repo)
        self.ports = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        self.binary, self.log_verbose = binary, log_verbose
        self.process: subprocess.Popen | None = None
        self.workspace: str | None = None
        self.log_path: str | None = None

    def command_and_env(self) -> tuple[list[str], dict]:
        env = dict(os.environ)
        site_packages = sysconfig.get_paths()["purelib"]
        env["PYTHONPATH"] = os.pathsep.join(p for p in (site_packages, env.get("PYTHONPATH")) if p)
        env["CLIPAD_SITE_PACKAGES"] = site_packages
        env["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), env.get("PATH", "")))
        binary, backends = self.binary, None
        if binary is None:
            bundled = pytriton_dist()
            if bundled:
                binary, libs = os.path.join(bundled, "bin", "tritonserver"), pytriton_libs(bundled)
                env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), libs) if p)
                backends = self._backends_from(bundled)
            else:
                binary = shutil.which("tritonserver")
        if not binary or not os.access(binary, os.X_OK):
            raise ClipadError("no Triton server: pip install 'clipad-edge[serve]' (ships tritonserver in "
                              "nvidia-pytriton), put tritonserver on PATH, or pass --tritonserver PATH")
        command = [binary, f"--model-repository={self.repo}", f"--http-port={self.ports['http']}",
                   f"--grpc-port={self.ports['grpc']}", f"--metrics-port={self.ports['metrics']}",
                   "--exit-timeout-secs=20", f"--log-verbose={self.log_verbose}"]
        if backends:
            command.append(f"--backend-directory={backends}")
        return command, env

    def _backends_from(self, bundled: str) -> str:
        """nvidia-pytriton keeps one Python-backend stub per Python version apart; Triton wants the one of this
        interpreter inside backends/python (pytriton itself copies it the same way)."""
        self.workspace = tempfile.mkdtemp(prefix="clipad-triton-")
        python = os.path.join(self.workspace, "backends", "python")
        shutil.copytree(os.path.join(bundled, "backends", "python"), python,
                        ignore=shutil.ignore_patterns("__pycache__"))
        stub = os.path.join(bundled, "python_backend_stubs", f"{sys.version_info[0]}.{sys.version_info[1]}",
                            "triton_python_backend_stub")
        if not os.path.isfile(stub):
            raise ClipadError(f"nvidia-pytriton has no Python-backend stub for Python "
                              f"{sys.version_info[0]}.{sys.version_info[1]}")
        shutil.copy2(stub, python)
        return os.path.join(self.workspace, "backends")

    def start(self, ready_timeout: float) -> None:
        check_repository(self.repo)
        for name, port in self.ports.items():
            if not port_free(port):
                raise ClipadError(f"--{name}-port {port}: already in use")
        command, env = self.command_and_env()
        fd, self.log_path = tempfile.mkstemp(prefix="clipad-tritonserver-", suffix=".log")
        self._log = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ClipadError(f"tritonserver {self.exit_reason()} while starting: {self.last_error()}")
            if self.ready():
                return
            time.sleep(0.25)
        self.stop()
        raise ClipadError(f"tritonserver not ready after {ready_timeout:g} s: {self.last_error()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['http']}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def exit_reason(self) -> str:
        """How the server process ended: a signal (killed from outside) or its exit status."""
        code = self.process.returncode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name} (from outside this command)"
        return f"exited with status {code}"

    def last_error(self) -> str:
        """The most telling lines of the server log: its errors (without the GPU-less machine's noise), else its
        last line."""
        try:
            with open(self.log_path, errors="replace") as fh:
                lines = [line.strip() for line in fh if line.strip()]
        except (OSError, TypeError):
            return "no log"
        noise = ("CudaDriverHelper", "NVML", "DCGM", "libprotobuf")
        errors = [line.split('] ', 1)[-1].strip('"') for line in lines
                  if (line.startswith("E") or line.startswith("error:")) and not any(n in line for n in noise)]
        text = "; ".join(errors[:2]) if errors else (lines[-1] if lines else "no output")
        return f"{text[:500]} (log: {self.log_path})"

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)   # Triton unloads its models and exits
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def close(self, keep_log: bool = False) -> None:
        self.stop()
        if getattr(self, "_log", None):
            self._log.close()
            if not keep_log:
                os.unlink(self.log_path)
        if self.workspace:
            shutil.rmtree(self.workspace, ignore_errors=True)

    @property
    def endpoints(self) -> dict[str, str]:
        return {"http": f"localhost:{self.ports['http']}", "grpc": f"localhost:{self.ports['grpc']}",
                "metrics": f"http://localhost:{self.ports['metrics']}/metrics"}


def pytriton_dist() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(next(iter(spec.submodule_search_locations)), "tritonserver")
    return folder if os.path.isfile(os.path.join(folder, "bin", "tritonserver")) else None


def pytriton_libs(bundled: str) -> str:
    package = os.path.dirname(bundled)
    for candidate in (os.path.join(os.path.dirname(package), "nvidia_pytriton.libs"),
                      os.path.join(bundled, "external_libs")):
        if os.path.isdir(candidate):
            return candidate
    return ""


def check_repository(repo: str) -> None:
    if not os.path.isdir(repo):
        raise ClipadError(f"{repo}: no such model repository (write one with export-engine --from-onnx DIR "
                          f"--triton-repo {repo})")
    models = [d for d in os.listdir(repo) if os.path.isfile(os.path.join(repo, d, "config.pbtxt"))]
    if not models:
        raise ClipadError(f"{repo}: no models (no */config.pbtxt)")
    python_models = [d for d in models if 'backend: "python"' in read_text(os.path.join(repo, d, "config.pbtxt"))]
    if python_models:
        import numpy

        if int(numpy.__version__.split(".")[0]) >= 2 and pytriton_dist():
            raise ClipadError(f"{', '.join(sorted(python_models))} run in Triton's Python backend, whose stub in "
                              f"nvidia-pytriton needs numpy<2 (this environment has {numpy.__version__}): install "
                              f"clipad-edge[serve] in its own environment and run edge-serve from there")


def read_text(path: str) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()
    except OSError as exc:
        raise ClipadError(f"{path}: unreadable ({exc.strerror})") from None


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def serve(args) -> int:
    for name in ("http_port", "grpc_port", "metrics_port"):
        port = getattr(args, name)
        if not 1 <= port <= 65535:
            raise ClipadError(f"--{name.replace('_', '-')} {port}: not a port number")
    if len({args.http_port, args.grpc_port, args.metrics_port}) < 3:
        raise ClipadError("--http-port, --grpc-port and --metrics-port must differ")
    server = Server(args.repo, args.http_port, args.grpc_port, args.metrics_port, args.tritonserver,
                    args.log_verbose)
    clean = False
    try:
        server.start(args.ready_timeout)
        e = server.endpoints
        if not args.quiet:
            print(f"Triton ready on {args.repo}: HTTP {e['http']}  gRPC {e['grpc']}  metrics {e['metrics']}  "
                  f"(log {server.log_path}); Ctrl-C stops it", flush=True)
        while server.process.poll() is None:
            time.sleep(0.5)
        killed = server.process.returncode is not None and server.process.returncode < 0
        detail = f"see its log {server.log_path}" if killed else server.last_error()
        raise ClipadError(f"tritonserver {server.exit_reason()}: {detail}")
    except KeyboardInterrupt as exc:   # Ctrl-C, or SIGTERM (Terminated): stop Triton first
        status = server.stop()
        clean = True
        if not args.quiet:
            print(f"Triton stopped (status {status})", flush=True)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_OK
    finally:
        server.close(keep_log=not clean)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli("edge-serve", lambda: serve(args), args.quiet)


if __name__ == "__main__":
    sys.exit(main())
