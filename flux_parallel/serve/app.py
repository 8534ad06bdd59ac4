"""Rank 0's side of tools/serve.py: the job queue and the HTTP API (FastAPI) in front of it: the service's
own routes (/generate, /health, /progress, the page) and the OpenAI Images API's (serve/openai.py).

The HTTP handlers run on uvicorn's event loop in a thread of their own; they check a request
(serve_request.py), queue it and await its answer. The rank loop (serve.py) takes the jobs one at a
time, in arrival order, and resolves each job's future with an image or an error.
"""

import asyncio
import base64
import collections
import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from flux_parallel.flux.images import encode_png
from flux_parallel.serve.openai import (
    APIError,
    Expiring,
    ImageFiles,
    ImagesRequest,
    form_fields,
    models_list,
    parse_edit,
    parse_generation,
)
from flux_parallel.serve.request import Limits, parse_request

PAGE = Path(__file__).resolve().parent / "page.html"
RECENT_JOBS = 64  # finished jobs /progress still knows


class Refused(Exception):
    """A request the queue cannot take now: `status` (429 full, 503 shutting down) and one sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class EventLog:
    """One OpenAI request's server-sent events, in order: queued {position}, step {step, steps}, then done
    {created, data} or error {error}. Kept after the request ends, for replay (GET .../{id}/events)."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.finished = False
        self._readers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # streams waiting for more

    def add(self, kind: str, data: dict) -> None:
        self.events.append((kind, data))  # list.append is atomic: the rank loop's thread and the event loop's
        self.finished = self.finished or kind in ("done", "error")
        for loop, more in list(self._readers):  # wake them now (no polling interval between a step and its event)
            try:
                loop.call_soon_threadsafe(more.set)
            except RuntimeError:  # that loop has closed: its stream is gone
                pass

    async def stream(self):
        """Every event as `event: KIND` / `data: JSON`, those to come included, until done or error."""
        reader = (asyncio.get_running_loop(), asyncio.Event())
        self._readers.append(reader)
        sent = 0
        try:
            while True:
                reader[1].clear()  # before reading: an event added from here on sets it again
                finished = self.finished  # before reading too: add() appends the last event, then sets it
                while sent < len(self.events):
                    kind, data = self.events[sent]
                    yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                    sent += 1
                if finished:
                    return
                await reader[1].wait()
        finally:
            self._readers.remove(reader)


class Job:
    """One request: the pipeline's keyword arguments, its progress and, once run, its outcome."""

    log: EventLog | None = None  # an OpenAI request's events, shared by its images' jobs

    def __init__(self, params: dict, request_id: str | None):
        self.params, self.request_id = params, request_id
        self.state, self.step, self.steps = "queued", 0, params["num_steps"]
        self.arrived = time.perf_counter()
        self.outcome: Future = Future()  # resolves to a dict: the image and its report, or status and error

    def on_progress(self, done: int, total: int) -> None:  # FluxPipeline.progress, called on rank 0
        self.step, self.steps = done, total
        if self.log is not None:
            self.log.add("step", {"step": done, "steps": total})

    def finish(self, **outcome) -> None:
        self.state = "done"
        self.outcome.set_result(outcome)

    def fail(self, status: int, message: str) -> None:
        self.state = "failed"
        self.outcome.set_result({"status": status, "error": message})


class JobQueue:
    """Requests in arrival order, at most `max_queue` waiting besides the running batch.

    `take` hands the rank loop the oldest job together with up to `max_batch - 1` later ones that can run
    in the same pipeline call (`batch_key`), waiting at most `window_s` for such company."""

    def __init__(self, max_queue: int, max_batch: int = 1, window_s: float = 0.0):
        self.max_queue, self.max_batch, self.window_s = max_queue, max_batch, window_s
        self.accepting = True  # a plain flag: the SIGTERM handler clears it
        self.current: list[Job] = []  # the batch that rank 0's own replica runs (serve.py's rank loop sets it)
        self.served = self.failed = self.largest_batch = 0
        self._waiting: collections.deque[Job] = collections.deque()
        self._recent: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._changed = threading.Condition()
        self._idle = 0  # replicas waiting in take() for a first job

    def submit(self, params: dict, request_id: str | None) -> Job:
        return self.submit_all([params], request_id)[0]

    def submit_all(self, params: list[dict], request_id: str | None, log: EventLog | None = None) -> list[Job]:
        """One job per entry of `params`, queued together or not at all (the request's id names the first);
        `log` receives their queued and step events."""
        with self._changed:
            if not self.accepting:
                raise Refused(503, "the service is shutting down and takes no new requests")
            if len(self._waiting) + len(params) > self.max_queue:
                raise Refused(429, f"the queue is full ({self.max_queue} requests waiting, --max-queue): "
                                   "try again when one has finished")
            jobs = [Job(p, request_id) for p in params]
            for job in jobs:
                job.log = log
                job.outcome.add_done_callback(self._count)  # runs before the HTTP handler wakes: /health is current
            if log is not None:
                log.add("queued", {"position": len(self._waiting) + 1})
            self._waiting.extend(jobs)
            if request_id:
                self._recent[request_id] = jobs[0]
                while len(self._recent) > RECENT_JOBS:
                    self._recent.popitem(last=False)
            self._changed.notify_all()
        return jobs

    def _count(self, outcome: Future) -> None:
        if "error" in outcome.result():
            self.failed += 1
        else:
            self.served += 1

    def take(self, timeout_s: float) -> list[Job]:
        """The next batch (each replica's rank loop calls this when it is free): the oldest job and the
        compatible ones after it, or [] after `timeout_s` without a job. While other replicas wait for work,
        a batch takes only its share of the waiting jobs and waits for no company: they run the rest at once."""
        with self._changed:
            self._idle += 1
            try:
                if not self._changed.wait_for(lambda: self._waiting, timeout=timeout_s):
                    return []
            finally:
                self._idle -= 1
            first = self._waiting.popleft()
            batch, key = [first], batch_key(first.params)
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                idle = self._idle
                share = -(-(len(batch) + len(self._waiting)) // (idle + 1)) if idle else self.max_batch
                batch += self._pop_matching(key, max(0, min(share, self.max_batch) - len(batch)))
                left = deadline - time.monotonic()
                if len(batch) == self.max_batch or idle or left <= 0 or not self.accepting:
                    break
                self._changed.wait(timeout=left)
            for job in batch:
                job.state = "running"
            self.largest_batch = max(self.largest_batch, len(batch))
        return batch

    def _pop_matching(self, key: tuple, count: int) -> list[Job]:
        matching = [job for job in self._waiting if batch_key(job.params) == key][:count]
        for job in matching:
            self._waiting.remove(job)
        return matching

    def close(self, status: int, message: str) -> None:
        """Take no more requests and answer every waiting one with `status`."""
        with self._changed:
            self.accepting = False
            while self._waiting:
                self._waiting.popleft().fail(status, message)
            self._changed.notify_all()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def progress(self, request_id: str) -> dict | None:
        job = self._recent.get(request_id)
        if job is None:
            return None
        if job.state == "queued":
            with self._changed:
                position = next((i for i, j in enumerate(self._waiting) if j is job), 0)
            return {"state": "queued", "position": position + 1}
        return {"state": job.state, "step": job.step, "steps": job.steps}


def batch_key(params: dict) -> tuple:
    """What the requests of one pipeline call share: all but the prompts and the seeds."""
    return tuple((k, v) for k, v in sorted(params.items()) if k not in ("prompt", "negative_prompt", "seed")) + \
        (params["negative_prompt"] is not None,)


def error(status: int, message) -> JSONResponse:
    return JSONResponse({"error": str(message)}, status_code=status)


def create_app(pipe, jobs: JobQueue, info: dict, size: tuple[int, int], limits: Limits,
               url_ttl_s: float = 3600.0, png_level: int = 6) -> FastAPI:
    """The API. `info` (model, world size, ...) is shown by /health, and its model is the OpenAI routes' model
    id; `size` is the default (height, width); `url_ttl_s`: how long the images of `url` responses are kept;
    `png_level`: the zlib level of the PNGs it sends (serve.py --png-level)."""
    app = FastAPI(title="flux-parallel", docs_url=None, redoc_url=None, openapi_url=None)
    page = PAGE.read_text()
    files, logs, started = ImageFiles(url_ttl_s), Expiring(url_ttl_s), int(time.time())

    @app.get("/", response_class=HTMLResponse)
    def index():
        return page

    def running() -> bool:  # rank 0's own replica, or another one (serve/replicas.py keeps their entries)
        return bool(jobs.current) or any(r["running"] for r in info.get("replicas", []))

    @app.get("/health")
    def health():
        status = "ok" if jobs.accepting else "stopping"
        return {"status": status, **info, "kind": pipe.kind, "default_height": size[0], "default_width": size[1],
                "queued": jobs.waiting, "max_queue": jobs.max_queue, "running": running(),
                "served": jobs.served, "failed": jobs.failed, "max_batch": jobs.max_batch,
                "largest_batch": jobs.largest_batch}

    @app.get("/progress")
    def progress(id: str = ""):
        if not id:
            return error(400, "give the id that the request was sent with: /progress?id=ID (header X-Request-Id)")
        state = jobs.progress(id)
        return error(404, f"no recent request has the id {id!r}") if state is None else state

    @app.post("/generate")
    async def generate(request: Request):
        try:
            params = parse_request(await request.body(), pipe, size, limits)
            job = jobs.submit(params, request.headers.get("x-request-id"))
        except ValueError as err:
            return error(400, err)
        except Refused as err:
            return error(err.status, err)
        outcome = await asyncio.wrap_future(job.outcome)
        if "error" in outcome:
            return error(outcome["status"], outcome["error"])
        start = time.perf_counter()
        # off the event loop, so that the ranks go on meanwhile
        png = await run_in_threadpool(encode_png, outcome.pop("image"), png_level)
        outcome["stages"]["png_encode_s"] = time.perf_counter() - start
        if "application/json" in request.headers.get("accept", ""):
            return {"image_png_base64": base64.b64encode(png).decode(), **outcome}
        headers = {"X-Report": json.dumps(outcome), "X-Batch-Size": str(outcome["batch_size"])}
        return Response(png, media_type="image/png", headers=headers)

    @app.get("/v1/models")
    def models():
        return models_list(info["model"], started)

    @app.post("/v1/images/generations")
    async def images_generations(request: Request):
        async def parse() -> ImagesRequest:
            return parse_generation(await request.body(), pipe, info["model"], size, limits)

        return await images(request, parse)

    @app.post("/v1/images/edits")
    async def images_edits(request: Request):
        async def parse() -> ImagesRequest:
            fields, images, mask = form_fields(await request.form())
            return await run_in_threadpool(parse_edit, fields, images, mask, pipe, info["model"], limits)

        return await images(request, parse)

    @app.get("/v1/images/generations/{request_id}/events")
    def images_events(request_id: str):
        log = logs.get(request_id)
        if log is None:
            missing = APIError(404, f"no recent request has the id {request_id!r} (the X-Request-Id it was sent "
                                    "with; events are kept for --url-ttl)", param="request_id", code="not_found")
            return missing.response()
        return StreamingResponse(log.stream(), media_type="text/event-stream")

    async def images(request: Request, parse):
        """Check and queue an images request (`parse` reads it), then answer it: JSON once every image is made,
        or, with `stream`, its events as they come."""
        try:
            if int(request.headers.get("content-length") or 0) > limits.max_body_bytes:  # before reading it
                raise APIError(413, f"the request body is larger than {limits.max_body_bytes} bytes "
                                    "(--max-body-bytes)", code="request_too_large")
            asked = await parse()
            log, request_id = EventLog(), request.headers.get("x-request-id")
            submitted = jobs.submit_all(asked.params, request_id, log)
        except APIError as err:
            return err.response()
        except Refused as err:
            return APIError(err.status, str(err), code="queue_full" if err.status == 429 else "unavailable").response()
        if request_id:
            logs.add(request_id, log)
        answer = asyncio.ensure_future(images_answer(request, submitted, asked.response_format, log))
        if asked.stream:
            return StreamingResponse(log.stream(), media_type="text/event-stream")
        return await answer

    async def images_answer(request: Request, submitted: list[Job], response_format: str, log: EventLog):
        """The OpenAI answer once every image of the request is made (b64_json, or URLs served here); its
        last event too."""
        outcomes = [await asyncio.wrap_future(job.outcome) for job in submitted]
        failed = next((o for o in outcomes if "error" in o), None)
        if failed is not None:
            log.add("error", {"error": {"message": failed["error"], "type": "server_error"}})
            return APIError(failed["status"], failed["error"]).response()
        pngs = await run_in_threadpool(lambda: [encode_png(o["image"], png_level) for o in outcomes])
        if response_format == "b64_json":
            data = [{"b64_json": base64.b64encode(png).decode()} for png in pngs]
        else:  # absolute URLs on the host and port this request came to
            root = str(request.base_url).rstrip("/")
            data = [{"url": f"{root}/v1/images/files/{files.add(png)}"} for png in pngs]
        body = {"created": int(time.time()), "data": data}
        # the event adds each image's report (size, seed, stage timings): the page shows them
        log.add("done", {**body, "reports": [{k: v for k, v in o.items() if k != "image"} for o in outcomes]})
        batch = str(max(o["batch_size"] for o in outcomes))  # the largest batch this request's images ran in
        return JSONResponse(body, headers={"X-Batch-Size": batch})

    @app.get("/v1/images/files/{name}")
    def image_file(name: str):
        png = files.get(name)
        if png is None:
            return APIError(404, f"no image {name!r} here: it expired (--url-ttl) or never existed",
                            code="not_found").response()
        return Response(png, media_type="image/png")

    return app
