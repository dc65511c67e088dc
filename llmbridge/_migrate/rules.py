"""The tables the codemod works from: what Flask names become, what Quart awaits, what blocks.

Kept apart from the code that applies them so a rule is one line to read or add; each entry
is checked against Flask 3.1 / Quart 0.22 and has a row in ``tests/test_migrate.py``.
"""

from __future__ import annotations

__all__ = [
    "ASYNC_CONTEXTS",
    "ASYNC_HELPERS",
    "BLOCKING_CALLS",
    "BRIDGE_METHODS",
    "CLIENT_METHODS",
    "EXTENSIONS",
    "HOOK_DECORATORS",
    "HOOK_REGISTRATIONS",
    "MODULES",
    "RENAMES",
    "REQUEST_ASYNC_ATTRS",
    "REQUEST_ASYNC_METHODS",
    "RESOURCE_OPENERS",
    "RESPONSE_ASYNC_ATTRS",
    "RESPONSE_ASYNC_METHODS",
    "VIEW_DECORATORS",
]

#: Modules whose imports move: ``from flask.views import MethodView`` → ``quart.views``.
MODULES = {
    "flask": "quart",
    "flask.views": "quart.views",
    "flask.testing": "quart.testing",
    "flask.cli": "quart.cli",
    "flask.json": "quart.json",
    "flask.ctx": "quart.ctx",
    "flask.wrappers": "quart.wrappers",
    "flask.sessions": "quart.sessions",
    "flask.blueprints": "quart.blueprints",
    "flask.typing": "quart.typing",
    "llmbridge.flask": "llmbridge.quart",
}

#: Names that differ between the two (everything else Flask exports, Quart exports too).
RENAMES = {
    "Flask": "Quart",
    "FlaskClient": "QuartClient",
    "FlaskCliRunner": "QuartCliRunner",
    "FlaskGroup": "QuartGroup",
    "FlaskBridge": "QuartBridge",
}

#: Helpers that are coroutines in Quart (imported from ``flask``/``quart``).
ASYNC_HELPERS = frozenset(
    {
        "flash",
        "make_response",
        "make_push_promise",
        "render_template",
        "render_template_string",
        "send_file",
        "send_from_directory",
        "stream_template",
        "stream_template_string",
    }
)

#: ``request.<attr>`` that Quart makes awaitable (the body is read asynchronously).
REQUEST_ASYNC_ATTRS = frozenset({"data", "files", "form", "json", "values", "body"})
#: ``request.<method>(...)`` that are coroutines in Quart.
REQUEST_ASYNC_METHODS = frozenset({"get_data", "get_json"})
#: On a test client's response.
RESPONSE_ASYNC_ATTRS = frozenset({"data", "json"})
RESPONSE_ASYNC_METHODS = frozenset({"get_data", "get_json"})

#: Test client requests: coroutines in Quart.
CLIENT_METHODS = frozenset({"delete", "get", "head", "open", "options", "patch", "post", "put"})

#: ``with X.<method>(...)`` that becomes ``async with``.
ASYNC_CONTEXTS = frozenset(
    {"app_context", "test_request_context", "session_transaction", "test_client"}
)
#: ``with X.<method>(...) as f`` → ``async with await X.<method>(...) as f`` (aiofiles).
RESOURCE_OPENERS = frozenset({"open_resource", "open_instance_resource"})

#: ``@app.<name>`` / ``@bp.<name>``: the decorated function is a view, hook or handler.
VIEW_DECORATORS = frozenset(
    {
        "after_app_request",
        "after_request",
        "after_serving",
        "app_context_processor",
        "app_errorhandler",
        "app_url_value_preprocessor",
        "before_app_request",
        "before_request",
        "before_serving",
        "context_processor",
        "delete",
        "errorhandler",
        "get",
        "patch",
        "post",
        "put",
        "route",
        "teardown_app_request",
        "teardown_appcontext",
        "teardown_request",
        "url_value_preprocessor",
    }
)
#: Decorators that need an app-like receiver (``get`` and ``post`` are common names).
HOOK_DECORATORS = VIEW_DECORATORS

#: ``app.<name>(..., fn)``: the argument (by keyword, else the last positional) is a view
#: or hook.
HOOK_REGISTRATIONS = {
    "add_url_rule": "view_func",
    "after_request": "",
    "before_request": "",
    "teardown_request": "",
    "teardown_appcontext": "",
    "before_app_request": "",
    "after_app_request": "",
    "register_error_handler": "",
    "context_processor": "",
    "before_serving": "",
    "after_serving": "",
}

#: FlaskBridge method → (QuartBridge method, whether the call must be awaited).
BRIDGE_METHODS = {
    "generate": ("generate", True),
    "agenerate": ("generate", False),
    "stream": ("stream", True),
    "astream": ("stream", False),
    "sse": ("sse", True),
    "asse": ("sse", False),
    "stream_response": ("stream_response", True),
    "astream_response": ("stream_response", False),
    "to_thread": ("to_thread", True),
    "ato_thread": ("to_thread", False),
    "to_process": ("to_process", True),
    "ato_process": ("to_process", False),
}

_THREAD = "blocks the event loop: wrap it in `await bridge.to_thread(...)`"
_DB = (
    "a synchronous database driver blocks the event loop: run its calls with "
    "`await bridge.to_thread(...)` or move to an async driver ({})"
)
#: Calls that block: dotted name → why and what to use instead.
BLOCKING_CALLS = {
    "time.sleep": "blocks the event loop: use `await asyncio.sleep(...)`",
    **{
        f"requests.{verb}": "a blocking HTTP call: use an `httpx.AsyncClient` or "
        "`await bridge.to_thread(requests." + verb + ", ...)`"
        for verb in ("get", "post", "put", "patch", "delete", "head", "options", "request")
    },
    "urllib.request.urlopen": "a blocking HTTP call: use an `httpx.AsyncClient`",
    "subprocess.run": _THREAD + " or use `asyncio.create_subprocess_exec`",
    "subprocess.check_output": _THREAD + " or use `asyncio.create_subprocess_exec`",
    "subprocess.call": _THREAD + " or use `asyncio.create_subprocess_exec`",
    "sqlite3.connect": _DB.format("aiosqlite"),
    "psycopg2.connect": _DB.format("asyncpg, or psycopg 3's AsyncConnection"),
    "psycopg.connect": _DB.format("psycopg's AsyncConnection.connect"),
    "pymysql.connect": _DB.format("aiomysql"),
    "mysql.connector.connect": _DB.format("aiomysql"),
    "pymongo.MongoClient": _DB.format("motor"),
    "redis.Redis": _DB.format("redis.asyncio"),
}

#: Flask extensions that don't work under Quart, with what to use instead.
EXTENSIONS = {
    "flask_cors": "Flask-CORS doesn't work with Quart: use quart-cors "
    "(`from quart_cors import cors`)",
    "flask_login": "Flask-Login doesn't work with Quart: use quart-auth",
    "flask_restful": "Flask-RESTful has no Quart port: use Quart's MethodView with async "
    "methods, or quart-schema for validated APIs",
    "flask_restx": "Flask-RESTX has no Quart port: use quart-schema",
    "flask_limiter": "Flask-Limiter doesn't work with Quart: use quart-rate-limiter",
    "flask_socketio": "Flask-SocketIO doesn't work with Quart: use Quart's websockets "
    "(`@app.websocket`)",
    "flask_sqlalchemy": "Flask-SQLAlchemy's session is synchronous: use SQLAlchemy's asyncio "
    "extension (or quart-sqlalchemy)",
    "flask_wtf": "Flask-WTF reads the form synchronously: use Quart-WTF",
    "flask_babel": "Flask-Babel doesn't work with Quart: use quart-babel",
    "flask_session": "Flask-Session doesn't work with Quart: use quart-session",
}
