"""Installing FlaskBridge changes nothing for routes that don't use it.

The same app is built twice, with and without the bridge, and every request below must
give the same status, headers, cookies and body on both, with the same hooks run in the
same order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import click
import pytest
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    g,
    jsonify,
    make_response,
    redirect,
    request,
    session,
    stream_with_context,
    url_for,
)
from werkzeug.exceptions import HTTPException, ImATeapot

from llmbridge.flask import FlaskBridge
from llmbridge.testing import simulated_engine


class Custom(Exception):
    pass


def build(with_bridge: bool, **options: Any) -> tuple[Flask, list[str]]:
    """An app using a broad slice of Flask; ``log`` records hooks and teardowns.
    ``options`` go to the bridge."""
    log: list[str] = []
    app = Flask(__name__)
    app.secret_key = "not secret"
    blueprint = Blueprint("bp", __name__, url_prefix="/bp")

    @app.before_request
    def before() -> Any:
        log.append(f"before {request.path}")
        g.seen = True
        if request.args.get("short") == "1":
            return "short-circuited", 202
        return None

    @app.after_request
    def after(response: Response) -> Response:
        log.append(f"after {response.status_code}")
        response.headers["X-After"] = "yes"
        return response

    @app.teardown_request
    def teardown_request(exc: BaseException | None) -> None:
        log.append(f"teardown_request {type(exc).__name__ if exc else None}")

    @app.teardown_appcontext
    def teardown_app(exc: BaseException | None) -> None:
        log.append("teardown_appcontext")

    @app.errorhandler(ImATeapot)
    def teapot(error: HTTPException) -> tuple[dict[str, Any], int]:
        return {"teapot": error.description}, 418

    @app.errorhandler(Custom)
    def custom(error: Custom) -> tuple[str, int, dict[str, str]]:
        return f"custom {error}", 409, {"X-Custom": "1"}

    @app.errorhandler(404)
    def not_found(error: HTTPException) -> tuple[str, int]:
        return "nothing here", 404

    @app.get("/text")
    def text() -> str:
        return "plain"

    @app.get("/json")
    def json_view() -> Any:
        return jsonify(a=1, b=[1, 2], g=g.seen)

    @app.get("/tuple")
    def tuple_view() -> tuple[str, int, dict[str, str]]:
        return "made", 201, {"X-Thing": "t", "Content-Language": "en"}

    @app.get("/cookie")
    def cookie() -> Response:
        response = make_response("cookie set")
        response.set_cookie("flavour", "oat", max_age=60, httponly=True, samesite="Lax")
        return response

    @app.get("/session/set")
    def session_set() -> str:
        session["user"] = request.args["user"]
        return "stored"

    @app.get("/session/get")
    def session_get() -> dict[str, Any]:
        return {"user": session.get("user")}

    @app.get("/redirect")
    def redirect_view() -> Response:
        return redirect(url_for("text"), code=303)

    @app.get("/abort/<int:code>")
    def abort_view(code: int) -> str:
        abort(code)

    @app.get("/teapot")
    def teapot_view() -> str:
        raise ImATeapot("short and stout")

    @app.get("/custom")
    def custom_view() -> str:
        raise Custom("conflict")

    @app.get("/crash")
    def crash() -> str:
        raise ValueError("unhandled")

    @app.post("/echo")
    def echo() -> Any:
        return {"json": request.get_json(), "form": request.form.to_dict()}

    @app.get("/stream")
    def stream() -> Response:
        def generate() -> Iterator[str]:
            yield "a"
            yield request.args.get("x", "b")
            yield "c"

        return Response(stream_with_context(generate()), mimetype="text/plain")

    @app.get("/async")
    async def async_view() -> dict[str, Any]:
        return {"async": True, "arg": request.args.get("q"), "g": g.seen}

    @app.get("/async-abort")
    async def async_abort() -> str:
        abort(403)

    @app.get("/async-crash")
    async def async_crash() -> str:
        raise Custom("from async")

    @blueprint.before_request
    def bp_before() -> None:
        log.append("bp before")

    @blueprint.errorhandler(KeyError)
    def bp_key_error(error: KeyError) -> tuple[str, int]:
        return f"bp missing {error}", 400

    @blueprint.get("/item/<name>")
    def bp_item(name: str) -> dict[str, str]:
        return {"item": name, "url": url_for("bp.bp_item", name=name)}

    @blueprint.get("/missing")
    def bp_missing() -> str:
        raise KeyError("k")

    app.register_blueprint(blueprint)

    @app.cli.command("greet")
    @click.argument("name")
    def greet(name: str) -> None:
        click.echo(f"hello {name}")

    if with_bridge:
        FlaskBridge(app, engine=simulated_engine(), **options)
    return app, log


REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("GET", "/text", {}),
    ("HEAD", "/text", {}),
    ("OPTIONS", "/text", {}),
    ("POST", "/text", {}),
    ("GET", "/json", {}),
    ("GET", "/tuple", {}),
    ("GET", "/cookie", {}),
    ("GET", "/redirect", {}),
    ("GET", "/abort/401", {}),
    ("GET", "/abort/403", {}),
    ("GET", "/abort/500", {}),
    ("GET", "/teapot", {}),
    ("GET", "/custom", {}),
    ("GET", "/crash", {}),
    ("GET", "/nowhere", {}),
    ("GET", "/text?short=1", {}),
    ("POST", "/echo", {"json": {"a": [1, "x"]}}),
    ("POST", "/echo", {"data": {"f": "v"}}),
    ("POST", "/echo", {"data": "{bad json", "content_type": "application/json"}),
    ("GET", "/stream?x=middle", {}),
    ("GET", "/async?q=1", {}),
    ("GET", "/async-abort", {}),
    ("GET", "/async-crash", {}),
    ("GET", "/bp/item/thing", {}),
    ("GET", "/bp/missing", {}),
    ("GET", "/bp/nowhere", {}),
]


def snapshot(app: Flask, log: list[str]) -> list[Any]:
    client = app.test_client()
    out: list[Any] = []
    for method, path, kwargs in REQUESTS:
        log.clear()
        reply = client.open(path, method=method, **kwargs)
        # The clock is not the bridge's: Date and a cookie's Expires second may differ
        # between the two snapshots, which run one after the other.
        headers = sorted(
            (k, re.sub(r"Expires=[^;]+", "Expires=<when>", v) if k == "Set-Cookie" else v)
            for k, v in reply.headers.items()
            if k != "Date"
        )
        out.append((method, path, reply.status, headers, reply.get_data(), list(log)))
    # Sessions and cookies round-trip through the client's cookie jar.
    client.get("/session/set?user=ada")
    reply = client.get("/session/get")
    out.append(("session", reply.json, client.get_cookie("session") is not None))
    out.append(
        ("cookie", client.get_cookie("flavour").value if client.get_cookie("flavour") else None)
    )
    follow = client.get("/redirect", follow_redirects=True)
    out.append(
        ("follow", follow.status_code, follow.get_data(), [r.status_code for r in follow.history])
    )
    return out


def test_responses_hooks_and_teardown_are_identical() -> None:
    """Every response (status, headers, cookies, body) and every hook/teardown call is
    the same with and without the bridge."""
    plain, plain_log = build(with_bridge=False)
    bridged, bridged_log = build(with_bridge=True)
    for left, right in zip(snapshot(plain, plain_log), snapshot(bridged, bridged_log), strict=True):
        assert left == right


def test_testing_mode_propagates_the_same_exceptions() -> None:
    """With TESTING on, unhandled errors propagate from sync and async views alike."""
    for with_bridge in (False, True):
        app, _ = build(with_bridge)
        app.config["TESTING"] = True
        client = app.test_client()
        with pytest.raises(ValueError, match="unhandled"):
            client.get("/crash")
        assert client.get("/async-crash").status_code == 409


def test_only_one_error_handler_and_the_async_hook_are_added() -> None:
    """The bridge adds one error handler (LLMBridgeError), the async_to_sync hook and
    its extension entry, and no route but its two probes (none with ``health=False``);
    sync functions pass through ensure_sync untouched."""
    plain, _ = build(with_bridge=False)
    bridged, _ = build(with_bridge=True, health=False)
    probed, _ = build(with_bridge=True)
    assert [r.rule for r in probed.url_map.iter_rules()] == [
        *(r.rule for r in plain.url_map.iter_rules()),
        "/livez",
        "/readyz",
    ]

    def handlers(app: Flask) -> dict[Any, Any]:
        return {
            (scope, code): sorted(c.__name__ for c in spec)
            for scope, by_code in app.error_handler_spec.items()
            for code, spec in by_code.items()
        }

    added = handlers(bridged)
    assert added.pop((None, None)) == sorted(["Custom", "LLMBridgeError"])
    expected = handlers(plain)
    assert expected.pop((None, None)) == ["Custom"]
    assert added == expected
    assert set(vars(bridged)) - set(vars(plain)) == {"async_to_sync"}
    assert set(bridged.extensions) - set(plain.extensions) == {"llmbridge"}
    for name in ("before_request_funcs", "after_request_funcs", "teardown_request_funcs"):
        assert getattr(bridged, name).keys() == getattr(plain, name).keys()
    assert [r.rule for r in bridged.url_map.iter_rules()] == [
        r.rule for r in plain.url_map.iter_rules()
    ]

    def sync_fn() -> None:
        pass

    assert bridged.ensure_sync(sync_fn) is sync_fn


def test_cli_commands_are_unchanged() -> None:
    """The app's CLI (custom commands, routes listing) behaves the same (the probes,
    the only routes the bridge adds, are off here: see the test above)."""
    outputs = []
    for with_bridge in (False, True):
        app, _ = build(with_bridge, health=False)
        runner = app.test_cli_runner()
        greet = runner.invoke(args=["greet", "ada"])
        routes = runner.invoke(args=["routes"])
        outputs.append((greet.exit_code, greet.output, routes.exit_code, routes.output))
    assert outputs[0] == outputs[1]
    assert outputs[0][1] == "hello ada\n"
