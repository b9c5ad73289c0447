"""`corolla dht` and `corolla server` start where the API's dependencies (the `api` extra) are not installed: the
command line imports FastAPI and uvicorn only for the commands that serve or chat, when they run."""

import subprocess
import sys
import textwrap

# Run in a fresh interpreter in which fastapi, uvicorn and starlette look uninstalled: every finder answers None
# for them, as for a missing package (an ImportError raised instead would also break find_spec-based checks).
HIDE_API = textwrap.dedent("""
    import contextlib, io, sys

    HIDDEN = ("fastapi", "uvicorn", "starlette")

    class Hide:
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in HIDDEN:
                return None
            return self.finder.find_spec(name, path, target)

        def __getattr__(self, attribute):
            return getattr(self.finder, attribute)

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]

    def run(*argv):
        from corolla.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(argv))
            except SystemExit as e:
                return e.code, out.getvalue(), err.getvalue()
        return 0, out.getvalue(), err.getvalue()

    def loaded():
        return sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)
""")


def run_hidden(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HIDE_API + textwrap.dedent(body)], capture_output=True, text=True,
                          timeout=120)


def test_dht_and_server_start_without_fastapi():
    result = run_hidden("""
        import importlib.util
        print("fastapi findable:", importlib.util.find_spec("fastapi") is not None)
        for command in ("dht", "server"):
            code, out, err = run(command, "--help")
            print(command, code, "usage: corolla " + command in out, repr(err[-300:]))
        from corolla.cli import build_parser
        args = build_parser().parse_args(["server", "some/model", "--num-blocks", "2"])
        print("parsed:", args.command, args.run.__name__)
        print("loaded:", loaded())
        # The API's commands stay listed; running one says what to install.
        code, out, err = run("api", "some/model", "--initial-peers", "/ip4/127.0.0.1/tcp/1")
        print("api", code, repr(err.strip()))
    """)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fastapi findable: False" in lines
    assert "dht 0 True ''" in lines, result.stdout
    assert "server 0 True ''" in lines, result.stdout
    assert "parsed: server cmd_server" in lines
    assert "loaded: []" in lines, result.stdout
    api_line = next(line for line in lines if line.startswith("api "))
    assert api_line.startswith("api 2 ") and "pip install 'corolla[api]'" in api_line, api_line


def test_building_the_parser_imports_no_web_modules():
    # With the API's packages installed too: building the whole parser (every command's options) loads none.
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        from corolla.cli import build_parser
        build_parser().parse_args(["dht"])
        print(sorted(m for m in sys.modules if m.partition(".")[0] in ("fastapi", "uvicorn", "starlette")))
    """)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", result.stdout
