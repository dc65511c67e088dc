"""``llmbridge migrate``, rule by rule: a table of Flask snippets and the Quart they become
(each also migrated twice: the second run changes nothing), what it reports it can't do,
and the command's output and exit statuses."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from llmbridge._cli.main import main
from llmbridge._migrate import migrate

pytestmark = pytest.mark.timeout(60)


def code(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def migrated(tmp_path: Path, files: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """Write ``files`` under ``tmp_path``, migrate them all together; the new texts (of the
    files that changed) and the findings, with paths relative to ``tmp_path``."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code(text))
    outcome = migrate([tmp_path])
    texts = {str(c.path.relative_to(tmp_path)): c.after for c in outcome.changes}
    findings = [str(f).replace(f"{tmp_path}/", "") for f in outcome.findings]
    for change in outcome.changes:
        change.write()
    return texts, findings


RULES: dict[str, tuple[dict[str, str], str, str]] = {
    "imports, Flask -> Quart": (
        {"app.py": "from flask import Flask, request\n\napp = Flask(__name__)\n"},
        "app.py",
        "from quart import Quart, request\n\napp = Quart(__name__)\n",
    ),
    "import flask, flask.Flask": (
        {"app.py": "import flask\n\napp = flask.Flask(__name__)\n"},
        "app.py",
        "import quart\n\napp = quart.Quart(__name__)\n",
    ),
    "views, hooks, error handlers -> async def": (
        {
            "app.py": """
            from flask import Flask

            app = Flask(__name__)


            @app.route("/")
            def index():
                return "hi"


            @app.before_request
            def before():
                pass


            @app.errorhandler(404)
            def missing(error):
                return {"error": "missing"}, 404
            """
        },
        "app.py",
        """
        from quart import Quart

        app = Quart(__name__)


        @app.route("/")
        async def index():
            return "hi"


        @app.before_request
        async def before():
            pass


        @app.errorhandler(404)
        async def missing(error):
            return {"error": "missing"}, 404
        """,
    ),
    "registered views and teardown hooks -> async def": (
        {
            "app.py": """
            from flask import Flask


            def create_app():
                app = Flask(__name__)
                app.add_url_rule("/", view_func=index)
                app.teardown_appcontext(close)
                return app


            def index():
                return "hi"


            def close(error=None):
                pass
            """
        },
        "app.py",
        """
        from quart import Quart


        def create_app():
            app = Quart(__name__)
            app.add_url_rule("/", view_func=index)
            app.teardown_appcontext(close)
            return app


        async def index():
            return "hi"


        async def close(error=None):
            pass
        """,
    ),
    "request body accessors are awaited": (
        {
            "app.py": """
            from flask import Flask, request

            app = Flask(__name__)


            @app.post("/")
            def view():
                name = request.form["name"]
                upload = request.files.get("file")
                raw = request.get_data()
                body = request.get_json(silent=True)
                return {"j": request.json, "d": len(request.data), "m": request.method}
            """
        },
        "app.py",
        """
        from quart import Quart, request

        app = Quart(__name__)


        @app.post("/")
        async def view():
            name = (await request.form)["name"]
            upload = (await request.files).get("file")
            raw = await request.get_data()
            body = await request.get_json(silent=True)
            return {"j": await request.json, "d": len(await request.data), "m": request.method}
        """,
    ),
    "templates, make_response, send_file, flash are awaited": (
        {
            "app.py": """
            from flask import Flask, flash, make_response, render_template, send_file
            from flask import render_template_string

            app = Flask(__name__)


            @app.get("/")
            def view():
                flash("saved")
                page = render_template("page.html") + render_template_string("{{ 1 }}")
                response = make_response(page)
                return send_file("x.txt") if page else response
            """
        },
        "app.py",
        """
        from quart import Quart, flash, make_response, render_template, send_file
        from quart import render_template_string

        app = Quart(__name__)


        @app.get("/")
        async def view():
            await flash("saved")
            page = await render_template("page.html") + await render_template_string("{{ 1 }}")
            response = await make_response(page)
            return await send_file("x.txt") if page else response
        """,
    ),
    "async propagates to callers, across modules": (
        {
            "pkg/__init__.py": "",
            "pkg/helpers.py": """
            from flask import request


            def body():
                return request.get_json()


            def name():
                return body()["name"]
            """,
            "pkg/views.py": """
            from flask import Blueprint

            from .helpers import name

            bp = Blueprint("views", __name__)


            @bp.post("/")
            def hello():
                return f"hello {name()}"
            """,
        },
        "pkg/helpers.py",
        """
        from quart import request


        async def body():
            return await request.get_json()


        async def name():
            return (await body())["name"]
        """,
    ),
    "a coroutine the code already hands on is left alone": (
        {
            "run.py": """
            import asyncio

            from flask import request


            async def main():
                pass


            def body():
                asyncio.run(main())
                return request.get_json()
            """
        },
        "run.py",
        """
        import asyncio

        from quart import request


        async def main():
            pass


        async def body():
            asyncio.run(main())
            return await request.get_json()
        """,
    ),
    "with app.app_context() -> async with": (
        {
            "setup.py": """
            from myapp import create_app


            def init():
                app = create_app()
                with app.app_context():
                    pass
            """
        },
        "setup.py",
        """
        from myapp import create_app


        async def init():
            app = create_app()
            async with app.app_context():
                pass
        """,
    ),
    "open_resource -> async with await, reads awaited": (
        {
            "db.py": """
            from flask import current_app


            def schema():
                with current_app.open_resource("schema.sql") as f:
                    return f.read().decode()
            """
        },
        "db.py",
        """
        from quart import current_app


        async def schema():
            async with await current_app.open_resource("schema.sql") as f:
                return (await f.read()).decode()
        """,
    ),
    "FlaskBridge -> QuartBridge and its twin names": (
        {
            "app.py": """
            from flask import Flask

            from llmbridge.flask import FlaskBridge

            app = Flask(__name__)
            bridge = FlaskBridge(app)


            @app.get("/a")
            def a():
                text = bridge.generate("hi")
                for chunk in bridge.stream("hi"):
                    text += chunk
                started = bridge.stream("hi")
                return bridge.sse(started)


            @app.get("/b")
            async def b():
                text = await bridge.agenerate("hi")
                size = await bridge.ato_thread(len, text)
                return await bridge.asse("hi")


            @app.get("/c")
            def c():
                stream = bridge.submit("hi")
                count = bridge.to_thread(len, "abc") + bridge.to_process(len, "abc")
                return {"text": stream.result(5).text, "n": count}


            @app.get("/d")
            def d():
                return bridge.stream_response("hi")


            @app.get("/e")
            def e():
                return {"chunks": [chunk for chunk in bridge.stream("hi")]}
            """
        },
        "app.py",
        """
        from quart import Quart

        from llmbridge.quart import QuartBridge

        app = Quart(__name__)
        bridge = QuartBridge(app)


        @app.get("/a")
        async def a():
            text = await bridge.generate("hi")
            async for chunk in bridge.stream("hi"):
                text += chunk
            started = await bridge.stream("hi")
            return await bridge.sse(started)


        @app.get("/b")
        async def b():
            text = await bridge.generate("hi")
            size = await bridge.to_thread(len, text)
            return await bridge.sse("hi")


        @app.get("/c")
        async def c():
            stream = bridge.submit("hi")
            count = await bridge.to_thread(len, "abc") + await bridge.to_process(len, "abc")
            return {"text": (await stream.aresult(5)).text, "n": count}


        @app.get("/d")
        async def d():
            return await bridge.stream_response("hi")


        @app.get("/e")
        async def e():
            return {"chunks": [chunk async for chunk in bridge.stream("hi")]}
        """,
    ),
    "an offload decorator's function is awaited, not made async": (
        {
            "app.py": """
            from flask import Flask

            from llmbridge.flask import FlaskBridge

            app = Flask(__name__)
            bridge = FlaskBridge(app)


            @bridge.to_thread(timeout=5)
            def lookup(key):
                return key.upper()


            @app.get("/")
            def view():
                return lookup("a")
            """
        },
        "app.py",
        """
        from quart import Quart

        from llmbridge.quart import QuartBridge

        app = Quart(__name__)
        bridge = QuartBridge(app)


        @bridge.to_thread(timeout=5)
        def lookup(key):
            return key.upper()


        @app.get("/")
        async def view():
            return await lookup("a")
        """,
    ),
    "MethodView methods are views; a common method name is not resolved to them": (
        {
            "app.py": """
            from flask import session
            from flask.views import MethodView


            class Items(MethodView):
                def get(self):
                    return {"user": session.get("user")}
            """
        },
        "app.py",
        """
        from quart import session
        from quart.views import MethodView


        class Items(MethodView):
            async def get(self):
                return {"user": session.get("user")}
        """,
    ),
    "a view decorator's wrapper awaits the view": (
        {
            "app.py": """
            import functools

            from flask import Flask, g, redirect

            app = Flask(__name__)


            def login_required(view):
                @functools.wraps(view)
                def wrapped(**kwargs):
                    if g.user is None:
                        return redirect("/login")
                    return view(**kwargs)

                return wrapped


            @app.get("/secret")
            @login_required
            def secret():
                return "s"
            """
        },
        "app.py",
        """
        import functools

        from quart import Quart, g, redirect

        app = Quart(__name__)


        def login_required(view):
            @functools.wraps(view)
            async def wrapped(**kwargs):
                if g.user is None:
                    return redirect("/login")
                return await view(**kwargs)

            return wrapped


        @app.get("/secret")
        @login_required
        async def secret():
            return "s"
        """,
    ),
    "a click command that must await runs in an app context": (
        {
            "cli.py": """
            import click
            from flask import current_app


            def work():
                with current_app.app_context():
                    pass


            @click.command("init")
            def init_command():
                work()
                click.echo("done")
            """
        },
        "cli.py",
        '''
        import click
        from quart import current_app
        import asyncio
        import functools
        from quart.cli import ScriptInfo


        def _run_async_command(fn):
            """Run the async click command ``fn`` in its app's context (added by ``llmbridge
            migrate``: click calls commands synchronously, and Flask's CLI pushed the context)."""

            @functools.wraps(fn)
            def command(*args, **kwargs):
                async def run():
                    app = click.get_current_context().ensure_object(ScriptInfo).load_app()
                    async with app.app_context():
                        return await fn(*args, **kwargs)

                return asyncio.run(run())

            return command


        async def work():
            async with current_app.app_context():
                pass


        @click.command("init")
        @_run_async_command
        async def init_command():
            await work()
            click.echo("done")
        ''',
    ),
    "test client calls, responses and fixtures": (
        {
            "tests/conftest.py": """
            import pytest

            from myapp import create_app


            @pytest.fixture
            def app():
                app = create_app()
                with app.app_context():
                    pass
                yield app


            @pytest.fixture
            def client(app):
                return app.test_client()
            """,
            "tests/test_views.py": """
            def test_index(client):
                response = client.post("/", data={"name": "a"})
                assert b"a" in response.data
                assert client.get("/").status_code == 200
                with client:
                    client.get("/")


            def test_plain():
                assert True
            """,
        },
        "tests/test_views.py",
        """
        import pytest


        pytestmark = pytest.mark.anyio  # the migrated tests run under anyio's plugin


        async def test_index(client):
            response = await client.post("/", form={"name": "a"})
            assert b"a" in await response.data
            assert (await client.get("/")).status_code == 200
            async with client, client.app.app_context():
                await client.get("/")


        def test_plain():
            assert True
        """,
    ),
    "async fixtures ask for anyio_backend, which the conftest pins to asyncio": (
        {
            "tests/conftest.py": """
            import pytest

            from myapp import create_app


            @pytest.fixture
            def app():
                app = create_app()
                with app.app_context():
                    pass
                yield app
            """,
        },
        "tests/conftest.py",
        """
        import pytest

        from myapp import create_app


        @pytest.fixture
        def anyio_backend():
            return "asyncio"  # Quart runs on asyncio (added by llmbridge migrate)


        @pytest.fixture
        async def app(anyio_backend):
            app = create_app()
            async with app.app_context():
                pass
            yield app
        """,
    ),
    "a monkeypatched stand-in for an async function becomes async": (
        {
            "pkg/__init__.py": "",
            "pkg/db.py": """
            from flask import current_app


            def init_db():
                with current_app.app_context():
                    pass
            """,
            "test_db.py": """
            def test_init(monkeypatch):
                def fake_init_db():
                    pass

                monkeypatch.setattr("pkg.db.init_db", fake_init_db)
            """,
        },
        "test_db.py",
        """
        def test_init(monkeypatch):
            async def fake_init_db():
                pass

            monkeypatch.setattr("pkg.db.init_db", fake_init_db)
        """,
    ),
    "from_prefixed_env keeps reading FLASK_* variables": (
        {
            "app.py": """
            from flask import Flask

            app = Flask(__name__)
            app.config.from_prefixed_env()
            """
        },
        "app.py",
        """
        from quart import Quart

        app = Quart(__name__)
        app.config.from_prefixed_env("FLASK")
        """,
    ),
    "comments and formatting are kept": (
        {
            "app.py": """
            from flask import (  # the framework
                Flask,
                request,
            )

            app = Flask(__name__)   # two spaces, kept


            @app.post("/")
            def view():  # a view
                # the body
                data = request.get_json(
                    force=True,  # even without a content type
                )
                return data
            """
        },
        "app.py",
        """
        from quart import (  # the framework
            Quart,
            request,
        )

        app = Quart(__name__)   # two spaces, kept


        @app.post("/")
        async def view():  # a view
            # the body
            data = await request.get_json(
                force=True,  # even without a content type
            )
            return data
        """,
    ),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_rule(tmp_path: Path, rule: str) -> None:
    """The snippet becomes the expected Quart code; a second run changes nothing."""
    files, name, expected = RULES[rule]
    texts, _ = migrated(tmp_path, files)
    assert texts[name] == code(expected)
    assert migrate([tmp_path]).changes == []


def test_code_already_on_quart_is_left_alone(tmp_path: Path) -> None:
    """Nothing to do: no change, no finding."""
    (tmp_path / "app.py").write_text(code(RULES["views, hooks, error handlers -> async def"][2]))
    outcome = migrate([tmp_path])
    assert (outcome.changes, outcome.findings) == ([], [])


def test_the_quart_example_needs_nothing(tmp_path: Path) -> None:
    """examples/quart_app (written for Quart by hand) is already what the codemod makes."""
    root = Path(__file__).resolve().parent.parent
    outcome = migrate([root / "examples" / "quart_app"])
    assert outcome.changes == []


REPORTS: dict[str, tuple[str, str]] = {
    "requests.get in a view": (
        """
        import requests
        from flask import Flask

        app = Flask(__name__)


        @app.get("/")
        def view():
            return requests.get("http://127.0.0.1:1/").text
        """,
        "app.py:9: requests.get() a blocking HTTP call: use an `httpx.AsyncClient` or "
        "`await bridge.to_thread(requests.get, ...)`",
    ),
    "time.sleep in a view": (
        """
        import time
        from flask import Flask

        app = Flask(__name__)


        @app.get("/")
        def view():
            time.sleep(1)
            return "late"
        """,
        "app.py:9: time.sleep() blocks the event loop: use `await asyncio.sleep(...)`",
    ),
    "a sync DB driver in a helper a view calls": (
        """
        import sqlite3
        from flask import Flask

        app = Flask(__name__)


        def db():
            return sqlite3.connect("x.db")


        @app.get("/")
        def view():
            return str(db())
        """,
        "app.py:8: sqlite3.connect() a synchronous database driver blocks the event loop: "
        "run its calls with `await bridge.to_thread(...)` or move to an async driver "
        "(aiosqlite)",
    ),
    "Flask-CORS": (
        "from flask_cors import CORS\n",
        "app.py:1: Flask-CORS doesn't work with Quart: use quart-cors "
        "(`from quart_cors import cors`)",
    ),
    "Flask-Login": (
        "import flask_login\n",
        "app.py:1: Flask-Login doesn't work with Quart: use quart-auth",
    ),
    "Flask-RESTful": (
        "from flask_restful import Api, Resource\n",
        "app.py:1: Flask-RESTful has no Quart port: use Quart's MethodView with async "
        "methods, or quart-schema for validated APIs",
    ),
    "an unknown extension": (
        "from flask_thing import Thing\n",
        "app.py:1: flask_thing is a Flask extension: check that it works with Quart, or replace it",
    ),
    "an async call at import time": (
        """
        from flask import request


        def body():
            return request.get_json()


        DATA = body()
        """,
        "app.py:8: calls an async function at import time: can't await here",
    ),
    "test client data= that isn't a dict literal": (
        """
        FORM = {"a": "b"}


        def test_post(client):
            client.post("/", data=FORM)
        """,
        "test_app.py:5: data= is raw bytes in Quart's test client: pass form= for a form, "
        "json= for JSON",
    ),
}


def test_a_raw_test_client_body_is_kept_without_a_finding(tmp_path: Path) -> None:
    """data= given text, bytes or json.dumps(...) is a raw body in both test clients."""
    source = """
    import json


    def test_post(client):
        client.post("/", data='"foo"')
        client.post("/", data=b"raw")
        client.post("/", data=json.dumps({"a": 1}))
    """
    texts, findings = migrated(tmp_path, {"test_app.py": source})
    assert findings == []
    assert texts["test_app.py"].count('await client.post("/", data=') == 3


@pytest.mark.parametrize("case", list(REPORTS))
def test_what_it_cannot_do_is_reported_with_file_and_line(tmp_path: Path, case: str) -> None:
    """Each thing the codemod can't make right is one ``file:line: reason`` finding."""
    source, expected = REPORTS[case]
    name = "test_app.py" if "test client" in case else "app.py"
    _, findings = migrated(tmp_path, {name: source})
    assert findings == [expected]


def test_diff_by_default_exit_1_then_write_exit_0_then_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The default prints a unified diff and exits 1 (like ``ruff format --diff``) without
    touching the file; ``--write`` applies it and exits 0; a run after that prints
    nothing and exits 0."""
    app = tmp_path / "app.py"
    source = code(RULES["imports, Flask -> Quart"][0]["app.py"])
    app.write_text(source)
    assert main(["migrate", str(app)]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"--- {app}\n+++ {app}\n")
    assert "-from flask import Flask, request\n+from quart import Quart, request\n" in out
    assert app.read_text() == source
    assert main(["migrate", "--write", str(tmp_path)]) == 0
    assert app.read_text() == code(RULES["imports, Flask -> Quart"][2])
    capsys.readouterr()
    assert main(["migrate", str(tmp_path)]) == 0
    assert capsys.readouterr() == ("", "")


def test_a_relative_path_gets_git_style_a_b_prefixes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from the project, the diff applies with ``patch -p1`` / ``git apply``."""
    (tmp_path / "app.py").write_text("from flask import Flask\n")
    monkeypatch.chdir(tmp_path)
    assert main(["migrate", "app.py"]) == 1
    assert capsys.readouterr().out.startswith("--- a/app.py\n+++ b/app.py\n")


def test_findings_go_to_stderr_and_keep_the_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Findings are printed on stderr; with nothing to rewrite the status stays 0."""
    (tmp_path / "app.py").write_text("from flask_cors import CORS\n")
    assert main(["migrate", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"{tmp_path / 'app.py'}:1: Flask-CORS doesn't work with Quart")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.py", None, "missing.py: no such file or directory"),
        ("broken.py", "def f(:\n", "broken.py:1: not valid Python"),
        ("latin.py", b"x = '\xe9'\n", "latin.py: can't read it"),
    ],
)
def test_errors_are_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    text: str | bytes | None,
    message: str,
) -> None:
    """A missing path, a syntax error or a file that isn't UTF-8: exit 2, one line on
    stderr, no traceback, nothing written."""
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text)
    elif isinstance(text, bytes):
        path.write_bytes(text)
    assert main(["migrate", "--write", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"llmbridge migrate: {tmp_path}/{message}")
    assert "Traceback" not in err
