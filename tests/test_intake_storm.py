"""Storm runs at the receiver (intake/incidents.py): alerts that arrive while a creation is in
flight start together as one storm run; a lone alert, or one that needs a person, starts a
run of its own; the storm's members survive the receiver's death on disk."""

from __future__ import annotations

import asyncio

from intake.errors import NoStormDeployment, Unavailable
from intake.incidents import Incidents, storm_key
from intake.launch import Started
from intake.spool import Spool
from tests.intake_fixtures import write_two_runbooks
from tests.intake_launchers import RecordingLauncher
from tests.test_intake_hostile import generic


class StormLauncher(RecordingLauncher):
    """Starts storms too; the first launch waits for ``release`` (a creation in flight)."""

    def __init__(self, hold_first: bool = True, storms_deployed: bool = True) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.hold_first = hold_first
        self.storms_deployed = storms_deployed
        self.storm_calls: list[dict] = []
        self.storm_attempts = 0

    async def _hold(self) -> None:
        if self.hold_first:
            self.hold_first = False
            self.holding.set()
            await self.release.wait()

    async def launch(self, planned):
        await self._hold()
        return await super().launch(planned)

    async def launch_storm(self, planned, key):
        await self._hold()
        self.storm_attempts += 1
        if self.fail:
            raise Unavailable(self.fail)
        if not self.storms_deployed:
            raise NoStormDeployment("rollback-storm/storm")
        run_id = f"storm-{key}"
        while run_id in self.died_runs:  # as DeploymentLauncher: never the dead storm
            key = f"{key}#after:{run_id}"
            run_id = f"storm-{key}"
        created = all(c["key"] != key for c in self.storm_calls)
        self.storm_calls.append({"key": key, "models": [i.model for i in planned]})
        return [Started(item, run_id, "storm", created) for item in planned]


def spool_in(tmp_path) -> Spool:
    return Spool(tmp_path / "spool")


def plans(tmp_path, n: int, needs_a_person: set[int] = frozenset()):
    """One firing alert for each of ``n`` models; those in ``needs_a_person`` have a runbook
    that approves nothing without a person."""
    from intake.mapping import RunbookIndex, plan
    from intake.sources import generic as parse_generic

    books = dict(RunbookIndex(write_two_runbooks(tmp_path)).books())
    base = books["churn-classifier"]
    out = []
    for i in range(n):
        policy = base.approval.model_copy(
            update={"auto_approve": [] if i in needs_a_person else ["always"]}
        )
        books[f"m{i}"] = base.model_copy(update={"model": f"m{i}", "approval": policy})
        out.append(plan(parse_generic(generic(model=f"m{i}", fingerprint=f"f{i}")), books)[0])
    return out


async def storm_of(incidents: Incidents, launcher: StormLauncher, requests, alone: int = 0):
    """The first request's creation is held; the others arrive meanwhile (``alone`` of them
    start runs of their own at once); then released."""
    first = asyncio.create_task(incidents.submit(requests[0]))
    await launcher.holding.wait()
    rest = [asyncio.create_task(incidents.submit(r)) for r in requests[1:]]
    while incidents.waiting + len(launcher.calls) < len(requests) - 1 or (
        len(launcher.calls) < alone
    ):
        await asyncio.sleep(0)
    launcher.release.set()
    return [await first] + [await t for t in rest]


def test_alerts_arriving_during_a_creation_start_as_one_storm_run(tmp_path):
    requests = plans(tmp_path, 6)

    async def scenario():
        launcher = StormLauncher()
        incidents = Incidents(launcher, storm_size=12, spool=spool_in(tmp_path), answer_within=60)
        answers = await storm_of(incidents, launcher, requests)
        again = await incidents.submit(requests[3])  # a monitor's re-send
        return launcher, incidents, answers, again

    launcher, incidents, answers, (again,) = asyncio.run(scenario())
    ids = [a[0].started.flow_run_id for a in answers]
    assert len(launcher.calls) == 1 and ids[0] == launcher.calls[0]["id"]  # the lone first
    assert len(set(ids[1:])) == 1 and ids[1].startswith("storm-")  # the rest: one storm run
    ((call),) = launcher.storm_calls
    assert call["key"] == storm_key([r[0].key for r in requests[1:]])
    assert sorted(call["models"]) == ["m1", "m2", "m3", "m4", "m5"]
    assert [a[0].outcome for a in answers] == ["started"] * 6
    assert (again.outcome, again.started.flow_run_id) == ("duplicate", ids[3])
    assert incidents.storms == 1 and incidents.waiting == 0


def test_a_storm_takes_at_most_storm_size_alerts_and_never_one_that_needs_a_person(tmp_path):
    requests = plans(tmp_path, 8, needs_a_person={2, 5})

    async def scenario():
        launcher = StormLauncher()
        incidents = Incidents(launcher, storm_size=3, spool=spool_in(tmp_path), answer_within=60)
        return launcher, await storm_of(incidents, launcher, requests, alone=2)

    launcher, answers = asyncio.run(scenario())
    storms = [c["models"] for c in launcher.storm_calls]
    assert sorted(len(models) for models in storms) == [2, 3]  # at most 3 a storm
    assert sorted(m for models in storms for m in models) == ["m1", "m3", "m4", "m6", "m7"]
    by_model = {a[0].planned.model: a[0].started.flow_run_id for a in answers}
    alone = {c["id"] for c in launcher.calls}  # runs of their own: the first, m2 and m5
    assert alone == {by_model["m0"], by_model["m2"], by_model["m5"]} and len(alone) == 3


def test_without_a_storm_deployment_the_alerts_start_runs_of_their_own(tmp_path, caplog):
    requests = plans(tmp_path, 4)

    async def scenario():
        launcher = StormLauncher(storms_deployed=False)
        incidents = Incidents(launcher, storm_size=12, spool=spool_in(tmp_path), answer_within=60)
        return launcher, incidents, await storm_of(incidents, launcher, requests)

    launcher, incidents, answers = asyncio.run(scenario())
    assert len(launcher.calls) == 4 and incidents.storms == 0
    assert len({a[0].started.flow_run_id for a in answers}) == 4
    assert "deploy prefect.yaml again to get storm runs" in caplog.text


def test_a_storms_members_are_on_disk_before_it_is_created_and_resumed_as_the_same_storm(
    tmp_path,
):
    """A receiver dies while its storm's creation fails: the next one finds the members
    still spooled and starts them under the same storm key (the server would answer with
    the run if the lost creation had made it); a storm seen created is remembered."""
    requests = plans(tmp_path, 4)
    spool = Spool(tmp_path / "spool")

    async def first_receiver():
        launcher = StormLauncher()
        incidents = Incidents(launcher, storm_size=12, spool=spool, answer_within=0)
        first = asyncio.create_task(incidents.submit(requests[0]))
        await launcher.holding.wait()
        rest = [asyncio.create_task(incidents.submit(r)) for r in requests[1:]]
        answers = [await t for t in rest]  # answered "pending" from the spool
        launcher.fail = "the Prefect server went away"
        launcher.release.set()
        await first
        while not launcher.storm_attempts:  # the storm's creation was tried, and failed
            await asyncio.sleep(0.01)
        return answers

    answers = asyncio.run(first_receiver())
    assert all(a[0].pending for a in answers)
    (record,) = spool.storms(max_age=900)
    key = storm_key([r[0].key for r in requests[1:]])
    assert record["key"] == key and sorted(record["members"]) == sorted(
        r[0].key for r in requests[1:]
    )
    assert (tmp_path / "spool" / "storms").stat().st_mode & 0o777 == 0o700

    books = {r[0].model: r[0].runbook for r in requests}

    async def second_receiver():
        launcher = StormLauncher(hold_first=False)
        incidents = Incidents(launcher, storm_size=12, spool=spool)
        await incidents.resume(spool.pending(books), spool.storms(max_age=900))
        while incidents.pending:
            await asyncio.sleep(0.01)
        again = await incidents.submit(requests[2])
        return launcher, again

    launcher, (again,) = asyncio.run(second_receiver())
    assert [c["key"] for c in launcher.storm_calls] == [key]
    assert again.outcome == "duplicate" and again.started.flow_run_id == f"storm-{key}"
    assert spool.pending(books) == []
    (record,) = spool.storms(max_age=900)
    assert record["flow_run_id"] == f"storm-{key}"

    async def third_receiver():  # the storm was created: its alerts' re-sends join it
        launcher = StormLauncher(hold_first=False)
        incidents = Incidents(launcher, storm_size=12, spool=spool)
        await incidents.resume(spool.pending(books), spool.storms(max_age=900))
        return launcher, await incidents.submit(requests[1])

    launcher, (joined,) = asyncio.run(third_receiver())
    assert joined.outcome == "duplicate" and joined.started.flow_run_id == f"storm-{key}"
    assert launcher.calls == [] and launcher.storm_calls == []
    assert spool.storms(max_age=0) == []  # older than the memory: forgotten


def test_a_drills_alert_never_shares_a_run(tmp_path):
    """A drill reads the report of the run its alert started, and cancels it when it gives
    up: it must not be a storm run holding other models' rollbacks."""
    import dataclasses

    from intake.incidents import may_share_a_run

    (item,) = plans(tmp_path, 1)[0]
    drill = dataclasses.replace(
        item, trigger=item.trigger.model_copy(update={"labels": {"drill": "drill-m0-1"}})
    )
    assert may_share_a_run(item) and not may_share_a_run(drill)


def test_the_same_alerts_after_their_storm_run_died_start_a_new_one(tmp_path):
    """A re-sent group after its storm run crashed: the same members make the same storm
    key, and the server would answer with the dead run; they start a new one instead."""
    requests = plans(tmp_path, 4)

    async def scenario():
        launcher = StormLauncher()
        incidents = Incidents(
            launcher, storm_size=12, spool=spool_in(tmp_path), answer_within=60, recheck_seconds=0
        )
        first = await storm_of(incidents, launcher, requests)
        launcher.die(first[1][0].started.flow_run_id)  # the storm run crashed
        launcher.die(first[0][0].started.flow_run_id)  # and the lone first run
        launcher.hold_first, launcher.release, launcher.holding = (
            True,
            asyncio.Event(),
            asyncio.Event(),
        )
        again = await storm_of(incidents, launcher, requests)
        return first, again

    first, again = asyncio.run(scenario())
    dead = first[1][0].started.flow_run_id
    assert {a[0].started.flow_run_id for a in again[1:]} != {dead}
    assert all(a[0].outcome == "started" for a in again)


def test_without_a_spool_every_alert_starts_a_run_of_its_own(tmp_path):
    """A storm's creation that failed uncertainly is retried under its key from the spool;
    without one its members' retries would group anew: no storms then."""
    assert Incidents(StormLauncher(), storm_size=12).storm_size == 1
    assert Incidents(StormLauncher(), storm_size=12, spool=spool_in(tmp_path)).storm_size == 12


def test_an_uncertain_storm_creation_is_retried_under_its_key_never_refused(tmp_path):
    """The server may have made the storm before the answer was lost: its members are
    answered "in hand" and the same key is tried again until the server has it."""
    requests = plans(tmp_path, 4)
    spool = spool_in(tmp_path)

    async def scenario():
        launcher = StormLauncher()
        incidents = Incidents(launcher, storm_size=12, spool=spool, answer_within=0.2)
        first = asyncio.create_task(incidents.submit(requests[0]))
        await launcher.holding.wait()
        rest = [asyncio.create_task(incidents.submit(r)) for r in requests[1:]]
        while incidents.waiting < 3:
            await asyncio.sleep(0)
        launcher.fail = "read timeout"
        launcher.release.set()
        answers = [await t for t in rest]
        launcher.fail = None
        while not launcher.storm_calls:
            await asyncio.sleep(0.05)
        await asyncio.gather(first, return_exceptions=True)  # the lone run: 503 or pending
        return launcher, answers

    launcher, answers = asyncio.run(scenario())
    assert all(a[0].pending for a in answers)  # 202, in hand: never a 503
    key = storm_key([r[0].key for r in requests[1:]])
    assert [c["key"] for c in launcher.storm_calls] == [key]


def test_alerts_for_the_drill_environment_never_share_a_run(tmp_path):
    """A monitored drill's alert comes from the real monitoring chain, with no drill label:
    the runbook's drill environment keeps its runs apart."""
    import dataclasses

    from intake.incidents import may_share_a_run

    (item,) = plans(tmp_path, 1)[0]
    staging = dataclasses.replace(item, environment=item.runbook.drill.environment)
    assert may_share_a_run(item) and not may_share_a_run(staging)
