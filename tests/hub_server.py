"""A stand-in for the Hugging Face hub on loopback: the HTTP routes that
datasets.load_dataset(name, streaming=True) uses, serving local folders as dataset repositories.

    hub = HubServer({"roneneldan/TinyStories": folder})   # then HF_ENDPOINT=hub.url
    hub.stop()                                              # refuses connections until hub.start()

The routes, all that datasets 5.2 with huggingface_hub 2.4 asks for (anything else is a 404; every
request is listed in hub.requests):

    HEAD, GET  /datasets/<repo>/resolve/<revision>/<path>   a file, or a byte range of it
    GET        /api/datasets/<repo>/revision/<revision>      the repository's info
    GET        /api/datasets/<repo>/tree/<revision>[/<path>] the listing of a folder

<revision> is main or the repository's one commit. Errors carry the X-Error-Code header by which
huggingface_hub tells a missing repository from a missing file.
"""

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

REPO = r"/datasets/(?P<repo>[^/]+/[^/]+)"
ROUTES = {
    "resolve": re.compile(rf"{REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)"),
    "info": re.compile(rf"/api{REPO}/revision/(?P<revision>[^/]+)"),
    "tree": re.compile(rf"/api{REPO}/tree/(?P<revision>[^/]+)(/(?P<path>.*))?"),
}


def git_id(data):
    """A 40-hex-digit id that changes with data, as the hub's commit and file ids do."""
    return hashlib.sha1(data).hexdigest()


class HubServer:
    """Serves {repository name: folder} at self.url, on 127.0.0.1, from a thread."""

    def __init__(self, repos):
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.commits = {name: git_id(b"".join(bytes(p) + p.read_bytes() for p in sorted(folder.rglob("*"))
                                              if p.is_file()))
                        for name, folder in self.repos.items()}
        self.requests, self.port = [], 0
        self.start()

    def start(self):
        """Answer at self.url: a free port the first time, the same one after a stop."""
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.hub = self
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        """Stop answering: connections are refused from now on."""
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def entry(self, repo, path):
        """The hub's description of the file or folder at path in repo, or None if there is none."""
        full = self.repos[repo] / path
        if full.is_file():
            data = full.read_bytes()
            return {"type": "file", "path": path, "size": len(data), "oid": git_id(data)}
        if full.is_dir():
            return {"type": "directory", "path": path, "oid": git_id(path.encode())}
        return None


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.0, the default: one request per connection, so that no open connection outlives stop().

    def do_GET(self):
        hub, self.commit = self.server.hub, None
        hub.requests.append(f"{self.command} {self.path}")
        url = urlsplit(self.path)
        for route, pattern in ROUTES.items():
            match = pattern.fullmatch(unquote(url.path))
            if match:
                break
        else:
            return self.error(404, "Not a route of this hub")
        repo = match["repo"]
        if repo not in hub.repos:
            return self.error(404, "Repository not found", "RepoNotFound")
        self.commit = hub.commits[repo]
        if match["revision"] not in ("main", self.commit):
            return self.error(404, "Revision not found", "RevisionNotFound")
        getattr(self, route)(hub, repo, match.groupdict().get("path"), parse_qs(url.query))

    do_HEAD = do_GET

    def resolve(self, hub, repo, path, query):
        entry = hub.entry(repo, path)
        if entry is None or entry["type"] != "file":
            return self.error(404, "Entry not found", "EntryNotFound")
        data = (hub.repos[repo] / path).read_bytes()
        status, headers = 200, {"ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged:
            start, end = int(ranged[1]), min(int(ranged[2] or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            status, data = 206, data[start:end + 1]
        self.reply(status, data, "application/octet-stream", headers)

    def info(self, hub, repo, path, query):
        self.reply(200, json.dumps({"id": repo, "sha": self.commit}).encode(), "application/json")

    def tree(self, hub, repo, path, query):
        folder = hub.repos[repo] / (path or "")
        if not folder.is_dir():
            return self.error(404, "Entry not found", "EntryNotFound")
        found = folder.rglob("*") if query.get("recursive") == ["true"] else folder.iterdir()
        listing = [hub.entry(repo, p.relative_to(hub.repos[repo]).as_posix()) for p in sorted(found)]
        self.reply(200, json.dumps(listing).encode(), "application/json")

    def error(self, status, message, code=None):
        headers = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
        self.reply(status, json.dumps({"error": message}).encode(), "application/json", headers)

    def reply(self, status, data, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.commit:  # the revision a file came from, which huggingface_hub caches it under
            self.send_header("X-Repo-Commit", self.commit)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format, *args):  # quiet: hub.requests is the log
        pass
