"""The emulator's quart-trio app: one route per GitHub endpoint it serves.

Every response gets a ``Date`` header from the emulator's clock and is
recorded in ``Emulator.requests``. Unknown paths and methods get GitHub's
404 body. Injected faults respond before any route or authentication runs.
"""

from __future__ import annotations

import json
import logging
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from daemon.sandbox import _checks, _git_http, _issues
from daemon.sandbox._auth import NOT_ACCESSIBLE, Token
from daemon.sandbox._common import APIError, invalid, iso8601
from daemon.sandbox._records import Fault, RecordedRequest
from daemon.sandbox._repos import valid_full_name

if TYPE_CHECKING:
    from daemon.sandbox.emulator import Emulator

__all__ = ["build_app"]

log = logging.getLogger(__name__)

_MAX_BODY = 100 * 1024 * 1024
_JSON = "application/json; charset=utf-8"


async def _raw_body() -> bytes:
    return await request.get_data(True, False, False)


async def _json_body() -> Any:
    data = await _raw_body()
    if not data:
        return {}
    try:
        return json.loads(data)
    except ValueError:
        raise APIError(400, "Problems parsing JSON") from None


def _per_page() -> int:
    raw = request.args.get("per_page", "30")
    try:
        value = int(raw)
    except ValueError:
        raise invalid(f"'per_page' must be an integer, not {raw!r}.") from None
    return max(1, min(value, 100))


def _page_slice(items: list[Any]) -> list[Any]:
    per_page = _per_page()
    raw = request.args.get("page", "1")
    try:
        page = max(1, int(raw))
    except ValueError:
        raise invalid(f"'page' must be an integer, not {raw!r}.") from None
    start = (page - 1) * per_page
    return items[start : start + per_page]


def _error_response(error: APIError) -> Response:
    response = Response(
        json.dumps(error.body()), status=error.status, content_type=_JSON
    )
    response.headers.update(error.headers)
    return response


def _fault_response(fault: Fault) -> Response:
    if fault.body is None:
        try:
            reason = HTTPStatus(fault.status).phrase
        except ValueError:
            reason = "Error"
        data = json.dumps(APIError(fault.status, reason).body()).encode()
        content_type = _JSON
    elif isinstance(fault.body, bytes | str):
        data = fault.body.encode() if isinstance(fault.body, str) else fault.body
        content_type = "text/plain; charset=utf-8"
    else:
        data = json.dumps(fault.body).encode()
        content_type = _JSON
    response = Response(data, status=fault.status, content_type=content_type)
    response.headers.update(fault.headers)
    return response


def _authorize(
    emulator: Emulator, owner: str, repo: str, permission: str, level: str
) -> Token:
    authorization = request.headers.get("Authorization", "")
    try:
        token = emulator.authority.authorize(
            authorization, f"{owner}/{repo}", permission, level
        )
    except APIError:
        known = emulator.authority.valid_token(authorization.partition(" ")[2].strip())
        if known is not None:
            g.installation_id = known.installation_id
        raise
    g.installation_id = token.installation_id
    return token


def _authorize_either(
    emulator: Emulator, owner: str, repo: str, permissions: tuple[str, str], level: str
) -> None:
    # Issue comments on a pull request take either the issues or the
    # pull_requests permission ("Create an issue comment", "Fine-grained
    # access" table).
    try:
        _authorize(emulator, owner, repo, permissions[0], level)
    except APIError as exc:
        if exc.status != 403 or exc.message != NOT_ACCESSIBLE:
            raise
        _authorize(emulator, owner, repo, permissions[1], level)


async def _serve_git(emulator: Emulator, owner: str, repo: str, rest: str) -> Response:
    # Git's smart HTTP protocol (gitprotocol-http(5)) has two requests for a
    # fetch: GET info/refs?service=git-upload-pack, then POST git-upload-pack.
    if not repo.endswith(".git"):
        raise APIError(404, "Not Found")
    full_name = f"{owner}/{repo.removesuffix('.git')}"
    if not valid_full_name(full_name):
        raise APIError(404, "Not Found")
    service = request.args.get("service")
    if rest == "git-receive-pack" or service == "git-receive-pack":
        raise APIError(403, "Write access to repository not granted.")
    smart_refs = rest == "info/refs" and service == "git-upload-pack"
    upload = rest == "git-upload-pack" and request.method == "POST"
    if not smart_refs and not upload:
        raise APIError(404, "Not Found")

    token = emulator.authority.authorize_git(
        request.headers.get("Authorization", ""), full_name
    )
    if token is None:
        raise APIError(
            401,
            "Invalid username or token.",
            headers={"WWW-Authenticate": 'Basic realm="GitHub"'},
        )
    g.installation_id = token.installation_id
    if full_name not in emulator.repositories:
        raise APIError(404, "Repository not found.")

    cgi = await _git_http.run_http_backend(
        project_root=emulator.store.root,
        path_info=f"/{full_name}.git/{rest}",
        method=request.method,
        query_string=request.query_string.decode(),
        content_type=request.headers.get("Content-Type", ""),
        content_encoding=request.headers.get("Content-Encoding"),
        git_protocol=request.headers.get("Git-Protocol"),
        body=await _raw_body(),
    )
    return Response(cgi.body, status=cgi.status, headers=cgi.headers)


def build_app(emulator: Emulator) -> QuartTrio:
    """Return the quart-trio app that serves ``emulator``'s endpoints."""
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = _MAX_BODY
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    _add_hooks(app, emulator)
    _add_app_routes(app, emulator)
    _add_check_run_routes(app, emulator)
    _add_commit_routes(app, emulator)
    _add_issue_routes(app, emulator)
    _add_delivery_routes(app, emulator)

    @app.route("/git/<owner>/<repo>/<path:rest>", methods=["GET", "POST"])
    async def git_smart_http(owner: str, repo: str, rest: str) -> Response:
        return await _serve_git(emulator, owner, repo, rest)

    return app


def _add_hooks(app: QuartTrio, emulator: Emulator) -> None:
    @app.before_request
    async def respond_with_fault() -> Response | None:
        g.arrived = emulator.now()
        g.installation_id = None
        fault = emulator.take_fault(request.method, request.path)
        if fault is None:
            return None
        if fault.delay:
            await trio.sleep(fault.delay)
        log.info("injected %d for %s %s", fault.status, request.method, request.path)
        return _fault_response(fault)

    @app.after_request
    async def stamp_and_record(response: Response) -> Response:
        response.headers["Date"] = formatdate(emulator.now(), usegmt=True)
        is_git = request.path.startswith("/git/")
        emulator.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                status=response.status_code,
                installation_id=g.get("installation_id"),
                time=g.get("arrived", emulator.now()),
                query=request.query_string.decode(),
                headers={
                    name.lower(): value for name, value in request.headers.items()
                },
                body=b"" if is_git else await _raw_body(),
            )
        )
        return response

    @app.errorhandler(APIError)
    async def api_error(error: APIError) -> Response:
        return _error_response(error)

    @app.errorhandler(404)
    async def not_found(error: Exception) -> Response:
        return _error_response(APIError(404, "Not Found"))

    @app.errorhandler(405)
    async def not_allowed(error: Exception) -> Response:
        return _error_response(APIError(404, "Not Found"))


def _add_app_routes(app: QuartTrio, emulator: Emulator) -> None:
    @app.get("/app")
    async def get_app() -> Any:
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        return emulator.app_json()

    @app.get("/app/installations")
    async def list_installations() -> Any:
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        installations = emulator.authority.installations
        return _page_slice(
            [
                emulator.installation_json(installations[key])
                for key in sorted(installations)
            ]
        )

    @app.get("/app/installations/<int:installation_id>")
    async def get_installation(installation_id: int) -> Any:
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        installation = emulator.authority.installations.get(installation_id)
        if installation is None:
            raise APIError(404, "Not Found")
        return emulator.installation_json(installation)

    @app.post("/app/installations/<int:installation_id>/access_tokens")
    async def create_access_token(installation_id: int) -> Any:
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        body = await _json_body()
        return emulator.authority.mint(installation_id, body), 201

    @app.get("/repos/<owner>/<repo>/installation")
    async def get_repository_installation(owner: str, repo: str) -> Any:
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        full_name = f"{owner}/{repo}"
        if full_name in emulator.repositories:
            for installation in emulator.authority.installations.values():
                if installation.reaches(full_name):
                    return emulator.installation_json(installation)
        raise APIError(404, "Not Found")

    @app.get("/repos/<owner>/<repo>")
    async def get_repository(owner: str, repo: str) -> Any:
        _authorize(emulator, owner, repo, "metadata", "read")
        return emulator.repositories[f"{owner}/{repo}"]

    @app.delete("/installation/token")
    async def revoke_installation_token() -> Response:
        token = emulator.authority.revoke(request.headers.get("Authorization", ""))
        g.installation_id = token.installation_id
        return Response(b"", status=204)

    @app.get("/installation/repositories")
    async def list_installation_repositories() -> Any:
        authorization = request.headers.get("Authorization", "")
        token = emulator.authority.valid_token(authorization.partition(" ")[2].strip())
        if token is None:
            raise APIError(401, "Bad credentials")
        g.installation_id = token.installation_id
        installation = emulator.authority.installations[token.installation_id]
        names = [
            name
            for name in sorted(emulator.repositories)
            if installation.reaches(name)
            and (token.repositories is None or name in token.repositories)
        ]
        return {
            "total_count": len(names),
            "repository_selection": (
                "all" if token.repositories is None else "selected"
            ),
            "repositories": _page_slice([emulator.repositories[n] for n in names]),
        }


def _add_check_run_routes(app: QuartTrio, emulator: Emulator) -> None:
    @app.post("/repos/<owner>/<repo>/check-runs")
    async def create_check_run(owner: str, repo: str) -> Any:
        _authorize(emulator, owner, repo, "checks", "write")
        body = await _json_body()
        return await emulator.create_check_run(f"{owner}/{repo}", body), 201

    @app.get("/repos/<owner>/<repo>/check-runs/<int:run_id>")
    async def get_check_run(owner: str, repo: str, run_id: int) -> Any:
        _authorize(emulator, owner, repo, "checks", "read")
        run = emulator.stored_check_run(f"{owner}/{repo}", run_id)
        return _checks.public_view(run)

    @app.patch("/repos/<owner>/<repo>/check-runs/<int:run_id>")
    async def update_check_run(owner: str, repo: str, run_id: int) -> Any:
        _authorize(emulator, owner, repo, "checks", "write")
        run = emulator.stored_check_run(f"{owner}/{repo}", run_id)
        body = await _json_body()
        if isinstance(body, dict) and "head_sha" in body:
            raise invalid("'head_sha' cannot be changed.")
        updated = _checks.apply_check_run(
            run, body, now=iso8601(emulator.now()), creating=False
        )
        emulator.check_runs[run_id] = updated
        return _checks.public_view(updated)

    @app.get("/repos/<owner>/<repo>/check-runs/<int:run_id>/annotations")
    async def list_annotations(owner: str, repo: str, run_id: int) -> Any:
        _authorize(emulator, owner, repo, "checks", "read")
        run = emulator.stored_check_run(f"{owner}/{repo}", run_id)
        return _page_slice(run["annotations"])

    @app.get("/repos/<owner>/<repo>/commits/<path:ref>/check-runs")
    async def list_check_runs(owner: str, repo: str, ref: str) -> Any:
        _authorize(emulator, owner, repo, "checks", "read")
        full_name = f"{owner}/{repo}"
        sha = await emulator.store.resolve_async(full_name, ref)
        if sha is None:
            raise APIError(422, f"No commit found for SHA: {ref}")
        runs = [
            run
            for run_id, run in emulator.check_runs.items()
            if emulator.check_run_repository[run_id] == full_name
            and run["head_sha"] == sha
        ]
        selected = _checks.select(
            runs,
            check_name=request.args.get("check_name"),
            status=request.args.get("status"),
            filter=request.args.get("filter", "latest"),
        )
        return {
            "total_count": len(selected),
            "check_runs": [_checks.public_view(run) for run in _page_slice(selected)],
        }


def _add_commit_routes(app: QuartTrio, emulator: Emulator) -> None:
    @app.get("/repos/<owner>/<repo>/pulls/<int:number>")
    async def get_pull(owner: str, repo: str, number: int) -> Any:
        # "Get a pull request" (docs.github.com/en/rest/pulls/pulls): the
        # head commit is what refs/pull/<number>/head names in the base
        # repository. Only the fields a client reads to find it are given.
        _authorize(emulator, owner, repo, "pull_requests", "read")
        full_name = f"{owner}/{repo}"
        head = await emulator.store.resolve_async(full_name, f"refs/pull/{number}/head")
        if head is None:
            raise APIError(404, "Not Found")
        repository = emulator.repositories[full_name]
        branch = repository["default_branch"]
        base = await emulator.store.resolve_async(full_name, f"refs/heads/{branch}")
        return {
            "number": number,
            "state": "open",
            "draft": False,
            "url": f"{emulator.api_url}/repos/{full_name}/pulls/{number}",
            "head": {"sha": head, "ref": f"pull/{number}/head", "repo": repository},
            "base": {"sha": base, "ref": branch, "repo": repository},
        }

    @app.get("/repos/<owner>/<repo>/commits/<path:ref>")
    async def get_commit(owner: str, repo: str, ref: str) -> Any:
        # "Get a commit" (docs.github.com/en/rest/commits/commits) takes a
        # sha, a branch name or a ref such as heads/main. GitHub returns 422
        # for a ref that names no commit.
        _authorize(emulator, owner, repo, "contents", "read")
        full_name = f"{owner}/{repo}"
        sha = None
        for candidate in (ref, f"refs/{ref}", f"refs/heads/{ref}"):
            if candidate.startswith("-"):
                continue
            sha = await emulator.store.resolve_async(full_name, candidate)
            if sha is not None:
                break
        if sha is None:
            raise APIError(422, f"No commit found for SHA: {ref}")
        return {
            "sha": sha,
            "node_id": f"C_{sha}",
            "url": f"{emulator.api_url}/repos/{full_name}/commits/{sha}",
        }


def _add_issue_routes(app: QuartTrio, emulator: Emulator) -> None:
    permissions = ("issues", "pull_requests")

    @app.post("/repos/<owner>/<repo>/issues/<int:number>/comments")
    async def create_comment(owner: str, repo: str, number: int) -> Any:
        _authorize_either(emulator, owner, repo, permissions, "write")
        body = await _json_body()
        return emulator.create_comment(f"{owner}/{repo}", number, body), 201

    @app.get("/repos/<owner>/<repo>/issues/<int:number>/comments")
    async def list_comments(owner: str, repo: str, number: int) -> Any:
        _authorize_either(emulator, owner, repo, permissions, "read")
        where = (f"{owner}/{repo}", number)
        items = [
            emulator.comments[comment_id]
            for comment_id, issue in sorted(emulator.comment_issue.items())
            if issue == where
        ]
        return _page_slice(items)

    @app.get("/repos/<owner>/<repo>/issues/comments/<int:comment_id>")
    async def get_comment(owner: str, repo: str, comment_id: int) -> Any:
        _authorize_either(emulator, owner, repo, permissions, "read")
        return emulator.stored_comment(f"{owner}/{repo}", comment_id)

    @app.patch("/repos/<owner>/<repo>/issues/comments/<int:comment_id>")
    async def update_comment(owner: str, repo: str, comment_id: int) -> Any:
        _authorize_either(emulator, owner, repo, permissions, "write")
        comment = emulator.stored_comment(f"{owner}/{repo}", comment_id)
        body = await _json_body()
        comment["body"] = _issues.comment_text(body)
        comment["updated_at"] = iso8601(emulator.now())
        return comment

    @app.post("/repos/<owner>/<repo>/pulls/<int:number>/reviews")
    async def create_review(owner: str, repo: str, number: int) -> Any:
        _authorize(emulator, owner, repo, "pull_requests", "write")
        body = await _json_body()
        return await emulator.create_review(f"{owner}/{repo}", number, body)


def _add_delivery_routes(app: QuartTrio, emulator: Emulator) -> None:
    @app.get("/app/hook/deliveries")
    async def list_deliveries() -> Any:
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        page, link = emulator.hooks.page(
            per_page=_per_page(),
            cursor=request.args.get("cursor"),
            api_url=emulator.api_url,
        )
        return page, 200, ({"Link": link} if link else {})

    @app.get("/app/hook/deliveries/<int:delivery_id>")
    async def get_delivery(delivery_id: int) -> Any:
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        return emulator.hooks.find(delivery_id)

    @app.post("/app/hook/deliveries/<int:delivery_id>/attempts")
    async def redeliver(delivery_id: int) -> Any:
        # GitHub responds 202 and sends later. The emulator sends before it
        # responds, so a test sees the redelivery once the request returns.
        emulator.verify_jwt(request.headers.get("Authorization", ""))
        await emulator.hooks.redeliver(delivery_id)
        return {}, 202
