"""CloudEvents from the agent: real cores, a real receiver on the CloudEvents SDK, the outbox across restarts."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web
from cloudevents.core.bindings.http import HTTPMessage, from_http_event
from handler_harness import POD_UID, AgentEnv, RealCore, cgroup_text

from handler import layout
from handler.agent.notify import EVENT_TYPE, NamespaceUnknown, event_id
from handler.agent.outbox import Outbox
from handler.agent.runner import Agent
from handler.agent.sinks import SinkConfigError, parse_sinks
from waiting import await_until, wait_until


@dataclass
class Receiver:
    """An HTTP CloudEvents receiver: parses every request with the SDK, answers from a script of statuses."""

    statuses: list[int] = field(default_factory=list)  # answered first, in order; then 202
    events: list[dict] = field(default_factory=list)  # {"id", "attributes", "data", "mode", "status"}
    url: str = ""
    runner: web.AppRunner | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event = from_http_event(HTTPMessage(headers=dict(request.headers), body=body))
        attrs = event.get_attributes()
        status = self.statuses.pop(0) if self.statuses else 202
        mode = "binary" if "ce-id" in {k.lower() for k in request.headers} else "structured"
        self.events.append(
            {
                "id": attrs["id"],
                "attributes": attrs,
                "data": event.get_data(),
                "mode": mode,
                "status": status,
                "authorization": request.headers.get("Authorization"),
            }
        )
        return web.Response(status=status)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}/"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def accepted(self) -> list[dict]:
        return [e for e in self.events if 200 <= e["status"] < 300]


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


class Namespaces:
    """Namespace labels and annotations as the API would give them; ``down`` makes every lookup fail."""

    def __init__(self, known: Mapping[str, tuple[dict[str, str], dict[str, str]]] | None = None) -> None:
        self.known = dict(known or {})
        self.down = False

    async def get(self, namespace: str) -> tuple[Mapping[str, str], Mapping[str, str]]:
        if self.down:
            raise NamespaceUnknown("the API is away")
        return self.known.get(namespace, ({}, {}))


async def wait_for(check: Callable[[], object], *, what: str, timeout: float = 30.0) -> None:
    await await_until(check, what=what, timeout=timeout)


def write_sinks(path: Path, *sinks: dict) -> Path:
    path.write_text(json.dumps({"sinks": list(sinks)}))  # JSON is YAML
    return path


def make_agent(env: AgentEnv, sinks_file: Path, namespaces: Namespaces, **cfg: object) -> Agent:
    """A second Agent object over the same host dir and storage (as after a restart)."""
    import dataclasses

    base = env.agent.cfg
    new = dataclasses.replace(base, event_sinks_file=sinks_file, handler=dataclasses.replace(base.handler), **cfg)
    agent = Agent(new, namespaces=namespaces)
    assert agent.notifier is not None
    agent.notifier.backoff_base = 0.05
    agent.notifier.backoff_max = 0.2
    agent.notifier.poll_interval = 0.05
    return agent


async def crash_in_pod(env: AgentEnv, core: RealCore, *, namespace: str, pod: str, time_: int) -> None:
    """A crash as the kernel reports it: core_pattern's shim, the agent's handler config, a pod's cgroup."""
    node = env.node
    if not (node.proc / str(core.pid)).exists():
        node.add_process(core.pid, cgroup=cgroup_text("containerd-systemd:v2"), exe=core.exe)
    for link in node.host.joinpath("var/log/containers").glob("*.log"):
        link.unlink()  # one pod at a time owns the container id of the fake cgroup
    node.add_log_link(namespace=namespace, pod=pod, container="app")
    r = await asyncio.to_thread(env.crash, core.path, pid=core.pid, signal=core.signal, time=time_)
    assert r.returncode == 0, r.stderr.decode()


class Running:
    """The agent's outcome pass and delivery loop, as ``Agent.run`` starts them, without the rest."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Running:
        assert self.agent.notifier is not None
        self.agent._stop = self.stop
        self.tasks = [
            asyncio.create_task(self.agent.notifier.run(self.stop)),
            asyncio.create_task(self.agent._every(0.05, self.agent.process_outcomes, "outcomes")),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def outbox_of(agent: Agent) -> Outbox:
    assert agent.notifier is not None
    return agent.notifier.outbox


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_every_captured_core_arrives_once_with_its_metadata(
    agent_env: AgentEnv, segv_core: RealCore, abort_core: RealCore, receiver: Receiver, tmp_path: Path, mode: str
) -> None:
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": receiver.url, "mode": mode})
    agent = make_agent(agent_env, sinks, Namespaces())
    async with Running(agent):
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await crash_in_pod(agent_env, abort_core, namespace="team-a", pod="web-0", time_=1795000100)
        await wait_for(lambda: len(receiver.accepted()) >= 2, what="two events")
        await wait_for(lambda: outbox_of(agent).size("rx")[0] == 0, what="an empty outbox")
        await asyncio.sleep(0.3)  # any duplicate would be sent within a few poll intervals
    assert len(receiver.events) == 2
    cores = {c.ref.core_id: c for c in layout.list_cores(agent_env.node.storage, namespace="team-a")}
    assert {e["mode"] for e in receiver.events} == {mode}
    for e in receiver.events:
        a, d = e["attributes"], e["data"]
        core = cores[d["coreID"]]
        assert a["specversion"] == "1.0" and a["type"] == EVENT_TYPE
        assert a["source"] == "/coredump.example.io/nodes/node-1"
        assert a["subject"] == f"team-a/web-0/app/{core.ref.core_id}"
        assert a["id"] == event_id(
            namespace="team-a", pod="web-0", pod_uid=POD_UID, container="app", core_id=core.ref.core_id
        )
        assert a["time"].isoformat().replace("+00:00", "Z") == core.metadata["timestamp"]
        assert d["digest"] == core.metadata["digest"] and d["size"] == core.metadata["size"]
        assert d["signal"] == core.metadata["signal"] and d["exe"] == core.metadata["exe"]
        assert d["dumpPath"] == (
            f"/apis/coredump.example.io/v1alpha1/namespaces/team-a/coredumpendpoints/web-0/"
            f"dump?container=app&core={core.ref.core_id}"
        )
        # metadata only: nothing of the core's bytes, nor the process environment
        assert len(json.dumps(d)) < 4096 and "environ" not in d
    assert {e["data"]["signal"] for e in receiver.events} == {segv_core.signal, abort_core.signal}
    assert agent.metrics.get("coredump_cloudevents_sent_total", sink="rx") == 2


async def test_a_sink_down_across_an_agent_restart_gets_every_event_when_it_comes_back(
    agent_env: AgentEnv, segv_core: RealCore, abort_core: RealCore, tmp_path: Path
) -> None:
    down = Receiver()
    await down.start()
    port = down.port
    await down.stop()  # nothing listens on the sink's port now
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": f"http://127.0.0.1:{port}/"})
    first = make_agent(agent_env, sinks, Namespaces())
    async with Running(first):
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await crash_in_pod(agent_env, abort_core, namespace="team-a", pod="web-0", time_=1795000100)
        await wait_for(lambda: outbox_of(first).size("rx")[0] == 2, what="two queued events")
        await wait_for(lambda: first.metrics.get("coredump_cloudevents_retries_total", sink="rx") >= 2, what="retries")
    # The agent is gone (a rollout); the events are on the node's disk, nowhere else.
    assert outbox_of(first).size("rx")[0] == 2
    back = Receiver()
    await back.start(port)
    try:
        second = make_agent(agent_env, sinks, Namespaces())
        async with Running(second):
            await wait_for(lambda: len(back.accepted()) == 2, what="both events after the restart")
            await wait_for(lambda: outbox_of(second).size("rx")[0] == 0, what="an empty outbox")
        ids = sorted(e["id"] for e in back.events)
        assert len(set(ids)) == 2
    finally:
        await back.stop()


async def test_a_receiver_answering_500_gets_the_same_event_again(
    agent_env: AgentEnv, segv_core: RealCore, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [500, 503]
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": receiver.url})
    agent = make_agent(agent_env, sinks, Namespaces())
    async with Running(agent):
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await wait_for(lambda: len(receiver.accepted()) == 1, what="the accepted retry")
    assert [e["status"] for e in receiver.events] == [500, 503, 202]
    assert len({e["id"] for e in receiver.events}) == 1
    assert {json.dumps(e["data"], sort_keys=True) for e in receiver.events}.__len__() == 1
    assert agent.metrics.get("coredump_cloudevents_retries_total", sink="rx") == 2


async def test_a_refused_event_is_dropped_and_counted_not_retried_forever(
    agent_env: AgentEnv, segv_core: RealCore, receiver: Receiver, tmp_path: Path
) -> None:
    receiver.statuses = [400]
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": receiver.url})
    agent = make_agent(agent_env, sinks, Namespaces())
    async with Running(agent):
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await wait_for(
            lambda: agent.metrics.get("coredump_cloudevents_dropped_total", sink="rx", reason="rejected") == 1,
            what="the rejection",
        )
        await asyncio.sleep(0.3)
    assert [e["status"] for e in receiver.events] == [400]
    assert outbox_of(agent).size("rx")[0] == 0


async def test_filters_by_namespace_list_selector_and_signal_and_the_namespace_opt_out(
    agent_env: AgentEnv, segv_core: RealCore, abort_core: RealCore, tmp_path: Path
) -> None:
    rx = {name: Receiver() for name in ("listed", "selected", "segv", "all")}
    for r in rx.values():
        await r.start()
    try:
        sinks = write_sinks(
            tmp_path / "sinks.yaml",
            {"name": "listed", "url": rx["listed"].url, "namespaces": ["team-a"]},
            {
                "name": "selected",
                "url": rx["selected"].url,
                "namespaceSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["prod"]}]},
            },
            {"name": "segv", "url": rx["segv"].url, "signals": ["SIGSEGV"]},
            {"name": "all", "url": rx["all"].url},
        )
        namespaces = Namespaces(
            {
                "team-a": ({"tier": "dev"}, {}),
                "team-b": ({"tier": "prod"}, {}),
                "quiet": ({"tier": "prod"}, {"coredump.example.io/events": "false"}),
            }
        )
        agent = make_agent(agent_env, sinks, namespaces)
        async with Running(agent):
            await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="a-0", time_=1795000000)
            await crash_in_pod(agent_env, abort_core, namespace="team-b", pod="b-0", time_=1795000100)
            await crash_in_pod(agent_env, segv_core, namespace="quiet", pod="q-0", time_=1795000200)
            await wait_for(
                lambda: (
                    agent.metrics.get("coredump_cloudevents_filtered_total", sink="all") == 1
                    and all(outbox_of(agent).size(n)[0] == 0 for n in rx)
                    and len(rx["all"].accepted()) == 2
                ),
                what="every queue empty, the opt-out seen",
            )
        got = {n: sorted((e["data"]["namespace"], e["data"]["signal"]) for e in r.events) for n, r in rx.items()}
        assert got["listed"] == [("team-a", segv_core.signal)]
        assert got["selected"] == [("team-b", abort_core.signal)]
        assert got["segv"] == [("team-a", segv_core.signal)]  # quiet opted out, team-b aborted
        assert got["all"] == [("team-a", segv_core.signal), ("team-b", abort_core.signal)]
    finally:
        for r in rx.values():
            await r.stop()


async def test_an_unknown_namespace_holds_its_events_until_it_can_be_read(
    agent_env: AgentEnv, segv_core: RealCore, receiver: Receiver, tmp_path: Path
) -> None:
    """The opt-out must hold while the API is away: nothing is sent for a namespace that cannot be read."""
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": receiver.url})
    namespaces = Namespaces({"team-a": ({}, {"coredump.example.io/events": "false"})})
    namespaces.down = True
    agent = make_agent(agent_env, sinks, namespaces)
    async with Running(agent):
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await wait_for(
            lambda: agent.metrics.get("coredump_cloudevents_retries_total", sink="rx") >= 3, what="the lookup retried"
        )
        assert receiver.events == [] and outbox_of(agent).size("rx")[0] == 1
        namespaces.down = False
        await wait_for(lambda: outbox_of(agent).size("rx")[0] == 0, what="the opted-out event leaving the queue")
    assert receiver.events == []


def test_a_full_outbox_drops_the_oldest_and_counts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", max_events=3, max_bytes=1 << 20)
    ids = [f"{i:032x}" for i in range(5)]
    dropped = [box.put("rx", event_id=i, event={"attributes": {"id": i}, "data": {}}) for i in ids]
    assert dropped == [0, 0, 0, 1, 1]
    assert [e.event_id for e in box.entries("rx")] == ids[2:]
    # the same event again (a core filed twice) is not queued twice
    assert box.put("rx", event_id=ids[4], event={"attributes": {"id": ids[4]}, "data": {}}) == 0
    assert len(box.entries("rx")) == 3
    by_bytes = Outbox(tmp_path / "bytes", max_events=100, max_bytes=300)
    for i in ids:
        by_bytes.put("rx", event_id=i, event={"attributes": {"id": i}, "data": {"pad": "x" * 40}})
    events, size = by_bytes.size("rx")
    assert size <= 300 and events < 5 and by_bytes.entries("rx")[-1].event_id == ids[-1]


async def test_a_full_outbox_is_counted_in_the_agents_metrics(
    agent_env: AgentEnv, segv_core: RealCore, abort_core: RealCore, tmp_path: Path
) -> None:
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": "http://127.0.0.1:9/"})
    agent = make_agent(agent_env, sinks, Namespaces(), outbox_max_events=1)
    async with Running(agent):
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await crash_in_pod(agent_env, abort_core, namespace="team-a", pod="web-0", time_=1795000100)
        await wait_for(
            lambda: agent.metrics.get("coredump_cloudevents_dropped_total", sink="rx", reason="outbox-full") == 1,
            what="the drop",
        )
    (entry,) = outbox_of(agent).entries("rx")
    newest = max(layout.list_cores(agent_env.node.storage, namespace="team-a"), key=lambda c: c.ref.core_id)
    assert entry.event_id == event_id(
        namespace="team-a", pod="web-0", pod_uid=POD_UID, container="app", core_id=newest.ref.core_id
    )
    assert b'coredump_cloudevents_dropped_total{reason="outbox-full",sink="rx"} 1.0' in agent.metrics.render()


async def test_the_bearer_token_file_is_sent_and_reread(
    agent_env: AgentEnv, segv_core: RealCore, abort_core: RealCore, receiver: Receiver, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": receiver.url, "tokenFile": str(token)})
    agent = make_agent(agent_env, sinks, Namespaces())
    async with Running(agent):
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await wait_for(lambda: len(receiver.accepted()) == 1, what="the first event")
        token.write_text("rotated")
        await crash_in_pod(agent_env, abort_core, namespace="team-a", pod="web-0", time_=1795000100)
        await wait_for(lambda: len(receiver.accepted()) == 2, what="the second event")
    assert [e["authorization"] for e in receiver.events] == ["Bearer first", "Bearer rotated"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("sinks: [{name: a, url: ftp://x/}]", "url must be an http"),
        ("sinks: [{name: a, url: 'http://x/', mode: fast}]", "mode must be binary or structured"),
        ("sinks: [{name: a, url: 'http://x/', namespace: [b]}]", "unknown key 'namespace'"),
        ("sinks: [{name: a, url: 'http://x/'}, {name: a, url: 'http://y/'}]", "named twice"),
        ("sinks: [{name: A_b, url: 'http://x/'}]", "name must be a DNS label"),
        ("sinks: [{name: a, url: 'http://x/', signals: [SIGNOPE]}]", "not a signal"),
        ("sinks: [{name: a, url: 'http://x/', timeout: 10}]", "timeout"),
        ("sinks: [{name: a, url: 'http://x/', caFile: ca.crt}]", "absolute path"),
        (
            "sinks: [{name: a, url: 'http://x/', namespaceSelector: {matchExpressions: [{key: t, operator: In}]}}]",
            "need values",
        ),
        ("sinks: {a: 1}", "sinks must be a list"),
        ("[1, 2", "not YAML"),
    ],
)
def test_a_bad_sinks_file_is_one_line_naming_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(SinkConfigError) as e:
        parse_sinks(text)
    assert message in str(e.value) and "\n" not in str(e.value)


async def test_a_broken_sinks_file_keeps_the_last_good_sinks(
    agent_env: AgentEnv, segv_core: RealCore, receiver: Receiver, tmp_path: Path
) -> None:
    sinks = write_sinks(tmp_path / "sinks.yaml", {"name": "rx", "url": receiver.url})
    agent = make_agent(agent_env, sinks, Namespaces())
    async with Running(agent):
        await wait_for(lambda: "rx" in agent.notifier._workers, what="the sink's worker")
        sinks.write_text("sinks: [{name: rx, url: nope}]")
        await crash_in_pod(agent_env, segv_core, namespace="team-a", pod="web-0", time_=1795000000)
        await wait_for(lambda: len(receiver.accepted()) == 1, what="the event through the last good sink")
    assert agent.notifier.sinks.error and "url must be" in agent.notifier.sinks.error


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_the_readmes_receiver_prints_what_it_promises(tmp_path: Path, mode: str) -> None:
    """The ten-line receiver of the README, run as printed (on a free loopback port), gets a real event."""
    import re
    import socket
    import subprocess
    import sys
    import urllib.request

    from handler.agent.notify import encode

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"<!-- receiver-example -->\n```python\n(.*?)```", readme, re.S)
    assert block, "the README's receiver example is gone"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = block.group(1).replace('host="0.0.0.0", port=8080', f'host="127.0.0.1", port={port}')
    assert code != block.group(1), "the example no longer listens where the test expects"
    script = tmp_path / "receiver.py"
    script.write_text(code)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stored = {
            "attributes": {
                "id": "0" * 32,
                "source": "/coredump.example.io/nodes/n1",
                "type": EVENT_TYPE,
                "subject": "team-a/web-0/app/20261201T000000Z-app-7-11",
                "time": "2026-12-01T00:00:00Z",
                "datacontenttype": "application/json",
                "namespace": "team-a",
                "pod": "web-0",
            },
            "data": {"signature": "5e1f", "dumpPath": "/apis/x/dump?core=1"},
        }
        headers, body = encode(stored, mode=mode)

        def delivered() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else "the receiver exited"
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status == 204

        wait_until(delivered, what="the example receiver to take the event", ignore=(OSError,), interval=0.1)
        line = proc.stdout.readline().split()
        while line and (line[0].startswith("=") or line[0].startswith("(Press")):  # aiohttp's start-up banner
            line = proc.stdout.readline().split()
        assert line == ["0" * 32, "team-a/web-0/app/20261201T000000Z-app-7-11", "5e1f", "/apis/x/dump?core=1"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_namespace_labels_and_the_opt_out_are_read_from_the_api(fake_kube, tmp_path: Path) -> None:
    """The real lookup, against the fake kube-apiserver's Namespace shape; a missing namespace is unknown."""
    from handler.agent.notify import KubeNamespaces, NamespaceGone

    fake_kube.add_namespace("team-a", labels={"tier": "prod"}, annotations={"coredump.example.io/events": "false"})
    lookup = KubeNamespaces(kubeconfig=str(fake_kube.write_kubeconfig(tmp_path / "kubeconfig")))
    try:
        labels, annotations = await lookup.get("team-a")
        assert labels["tier"] == "prod" and annotations["coredump.example.io/events"] == "false"
        with pytest.raises(NamespaceGone):
            await lookup.get("gone")
    finally:
        await lookup.close()
