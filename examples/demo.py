"""Serve the Flask example app on the simulated engine: ``python examples/demo.py``.

Opens a threaded werkzeug server on 127.0.0.1, prints the URL, streams a few
completions side by side in the terminal as a self-check, and serves until Ctrl-C
(or SIGTERM), then stops cleanly. ``--port 0`` picks a free port.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import FrameType

from werkzeug.serving import make_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.flask_app import bridge, create_app

PROMPTS = ("Tell me about engines", "Why one owner thread?", "How do streams stay apart?")


def preview(base: str, tokens: int) -> None:
    """Stream a few prompts at once through the server and print each one's text."""
    results: dict[str, str] = {}

    def read(prompt: str) -> None:
        query = urllib.parse.urlencode({"prompt": prompt, "max_tokens": tokens})
        text: list[str] = []
        with urllib.request.urlopen(f"{base}/v1/stream?{query}", timeout=60) as reply:
            for raw in reply:
                line = raw.decode().rstrip("\n")
                if line.startswith("data: ") and '"text"' in line:
                    text.append(json.loads(line[6:]).get("text", ""))
        results[prompt] = "".join(text)

    started = time.monotonic()
    threads = [threading.Thread(target=read, args=(p,), daemon=True) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    elapsed = time.monotonic() - started
    print(f"{len(results)} concurrent streams in {elapsed:.2f} s, each with its own text:")
    for prompt in PROMPTS:
        print(f"  {prompt!r:32} ->{results.get(prompt, ' (no answer)')}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--no-preview", action="store_true", help="skip the terminal preview")
    parser.add_argument("--tokens", type=int, default=12, help="tokens per preview stream")
    args = parser.parse_args(argv)

    app = create_app()
    server = make_server(args.host, args.port, app, threaded=True)
    base = f"http://{args.host}:{server.port}"
    # /v1/answer reads its context from this app's own /kb unless told otherwise: set
    # here, from the address we bound, never from what a request says the host is.
    if app.config["EXAMPLE_RETRIEVAL_URL"] is None:
        local = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else args.host
        local = f"[{local}]" if ":" in local else local
        app.config["EXAMPLE_RETRIEVAL_URL"] = f"http://{local}:{server.port}/kb"
    print(f"llmbridge demo: serving the Flask example app on {base}/ (Ctrl-C to stop)")
    sys.stdout.flush()

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    if not args.no_preview:
        threading.Thread(target=preview, args=(base, args.tokens), daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        bridge.close()
    print("llmbridge demo: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
