"""What front-ends call for group storytelling, and the timers and model turns behind it.

    storytime.attach("slack", surface)        # how to speak in a thread on that platform
    await storytime.resume("slack")           # after a restart: open sessions carry on
    reply = await storytime.add(place, actor, text)   # every command: commit, then reply

Each command loads the session, applies one rule from rules.py, and commits the row
before it returns the reply, so whatever a user is told survives a restart. What the
thread should hear afterwards (whose turn, the model's line) runs in the background.
Deadlines are wall-clock times in the row; `tick()` acts on those that have passed,
and `run_timers` calls it when the next one is due. Tests call `tick()` with a clock
of their own instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace

from bot import messages
from bot.storytime import describe, rules, votes
from bot.storytime.export import credits, filename, to_markdown
from bot.storytime.grammar import StorytimeCommand
from bot.storytime.limits import StorytimeLimits
from bot.storytime.model_turns import model_request, write_line
from bot.storytime.session import Actor, Place, Session, StartOptions, StorytimeError
from bot.storytime.store import SessionStore
from bot.storytime.surface import Surface
from storygen.errors import WorkerUnavailableError
from storygen.stories import pick_genre
from storygen.queue_front import QueueFront

logger = logging.getLogger(__name__)

MAX_TIMER_SLEEP_S = 30.0


class StorytimeService:
    def __init__(self, worker: QueueFront, store: SessionStore, limits: StorytimeLimits = StorytimeLimits(),
                 clock: Callable[[], float] = time.time) -> None:
        self.worker = worker
        self.store = store
        self.limits = limits
        self.clock = clock
        self.surfaces: dict[str, Surface] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._turns: dict[str, asyncio.Task] = {}  # session id -> its model turn in progress
        self._background: set[asyncio.Task] = set()
        self._wake = asyncio.Event()

    def attach(self, platform: str, surface: Surface) -> None:
        self.surfaces[platform] = surface

    # --- commands -------------------------------------------------------------------------------

    async def start(self, place: Place, actor: Actor, options: StartOptions,
                    open_thread: Callable[[Session], Awaitable[str]]) -> Session:
        """Open a session; `open_thread(session)` posts its first message and returns where it lives."""
        existing = self.store.find_open(place.server_key, place.channel)
        if existing is not None:
            raise StorytimeError(messages.ST_ALREADY_OPEN.format(title=existing.title))
        if len(self.store.open_sessions(server_key=place.server_key)) >= self.limits.max_sessions:
            raise StorytimeError(messages.ST_TOO_MANY_SESSIONS.format(limit=self.limits.max_sessions))
        # The genre the model will write in: `auto` is decided once, from the opening; a model's unknown genre is refused.
        genre, _ = pick_genre(options.genre, options.opening or options.title, self.worker.lm, self.worker.config)
        options = replace(options, genre=genre.name)
        session = rules.new_session(uuid.uuid4().hex[:8], place, "", actor, options, self.limits, self.clock())
        session.thread = await open_thread(session)
        self.store.save(session)
        logger.info("storytime %s (%s) started by %s", session.session_id, session.key, actor.user)
        told = [messages.ST_LINE.format(name=session.name_of(actor.user), text=session.lines[0].text)] \
            if session.lines else []
        self._after(session, told + ([] if session.model else describe.turn_notice(session)))
        return session

    async def join(self, place: Place, actor: Actor) -> str:
        async with self._session(place) as session:
            told = rules.join(session, actor, self.limits, self.clock())
            self.store.save(session)
        self._after(session, told)
        return told[0]

    async def leave(self, place: Place, actor: Actor) -> str:
        async with self._session(place) as session:
            told = rules.leave(session, actor, self.clock())
            self.store.save(session)
        self._after(session, told)
        return told[0]

    async def add(self, place: Place, actor: Actor, text: str, *, echo: bool = True) -> str:
        """A player's line. `echo`: post it in the thread (a slash command's text is seen by nobody else)."""
        async with self._session(place) as session:
            rules.check_can_add(session, actor)
            line = rules.clean_line(text, self.limits)
            told = rules.add_line(session, actor, line, self.clock())
            self.store.save(session)
        shown = [messages.ST_LINE.format(name=session.name_of(actor.user), text=line)] if echo else []
        self._after(session, shown + told)
        return messages.ST_ADDED.format(left=session.turns_left)

    async def undo(self, place: Place, actor: Actor) -> str:
        async with self._session(place) as session:
            line, told = rules.undo(session, actor, self.clock())
            self.store.save(session)
        undone = describe.undone(session, line)
        self._after(session, [undone, *told])
        return undone

    async def vote(self, platform: str, session_id: str, actor: Actor, index: int) -> str:
        async with self._locks[session_id]:
            session = self.store.get(session_id)
            if session is None or session.status != "open" or session.platform != platform:
                raise StorytimeError(messages.ST_VOTE_CLOSED)
            reply = votes.cast(session, actor, index, self.clock())
            told = self._close_vote(session, timed_out=False) if votes.everyone_voted(session) else []
            self.store.save(session)
        self._after(session, told)
        return reply

    async def end(self, place: Place, actor: Actor, session_id: str | None = None) -> str:
        if session_id:
            session = self.store.get(session_id)
            if session is None or session.status != "open" or session.server_key != place.server_key:
                raise StorytimeError(messages.ST_END_NOT_FOUND.format(session_id=session_id))
        else:
            session = self._find(place)
        if actor.user != session.starter and not actor.is_admin:
            raise StorytimeError(messages.ST_END_ONLY)
        name = actor.name or session.name_of(actor.user)
        ended = await self._end(session.session_id, messages.ST_END_ASKED.format(name=name))
        return messages.ST_ENDED_ACK.format(title=(ended or session).title)

    def status(self, place: Place) -> str:
        return describe.status(self._find(place), self.limits, self.clock())

    def list(self, place: Place, actor: Actor) -> str:
        if not actor.is_admin:
            raise StorytimeError(messages.ST_LIST_ONLY)
        return describe.listing(self.store.open_sessions(server_key=place.server_key))

    # --- restarts and timers --------------------------------------------------------------------

    async def act(self, place: Place, actor: Actor, command: StorytimeCommand) -> str | None:
        """The reply to the actions every front-end handles alike; None for `start` and `help`,
        which each platform does its own way (where the session lives, what the help says)."""
        if command.action == "add":
            return await self.add(place, actor, command.text)
        if command.action == "end":
            return await self.end(place, actor, command.session_id or None)
        if command.action in ("join", "leave", "undo"):
            return await getattr(self, command.action)(place, actor)
        if command.action == "status":
            return self.status(place)
        if command.action == "list":
            return self.list(place, actor)
        return None

    async def resume(self, platform: str) -> int:
        """After a restart: every open session carries on; a model turn cut off is run again once."""
        sessions = self.store.open_sessions(platform)
        for session in sessions:
            if session.model is None:
                continue
            if session.model.message:  # the last run's half-written line: say it stopped there
                await self._settle_left(session)
            if session.model.attempts >= 2:
                async with self._locks[session.session_id]:
                    session = self.store.get(session.session_id)
                    told = [messages.ST_MODEL_DROPPED, *rules.finish_model_turn(session, self.clock())]
                    self.store.save(session)
                self._after(session, told)
            else:
                self._after(session, [messages.ST_MODEL_RERUN])
        await self.tick()
        logger.info("storytime: %s open sessions on %s resumed", len(sessions), platform)
        return len(sessions)

    async def _settle_left(self, session: Session) -> None:
        model = session.model
        label = messages.ST_VOTE_OPTION.format(number=len(model.options) + 1) if model.kind == "vote" \
            else messages.STORYTIME_BOT_NAME
        try:
            await self.surfaces[session.platform].settle(session, model.message, label, None)
        except Exception as error:  # deleted, or the thread is gone: nothing left to fix
            logger.warning("storytime %s: could not mark the interrupted line: %s", session.session_id, error)
        async with self._locks[session.session_id]:
            fresh = self.store.get(session.session_id)
            if fresh is not None and fresh.model is not None:
                fresh.model.message = ""
                self.store.save(fresh)

    async def tick(self) -> None:
        """Act on every deadline that has passed: votes close, turns are skipped, idle sessions end."""
        now = self.clock()
        for session in self.store.open_sessions():
            if session.platform in self.surfaces and rules.next_deadline(session, self.limits) <= now:
                await self._tick(session.session_id, now)

    async def _tick(self, session_id: str, now: float) -> None:
        async with self._locks[session_id]:
            session = self.store.get(session_id)
            if session is None or session.status != "open":
                return
            told: list[str] = []
            if session.vote is not None and session.vote.deadline <= now:
                told += self._close_vote(session, timed_out=True)
            told += rules.expire_turn(session, self.limits, now)
            self.store.save(session)
        self._after(session, told)

    async def run_timers(self, stop: asyncio.Event) -> None:
        """In production: tick whenever the next deadline is due (or a command may have moved it)."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                logger.exception("storytime timers failed; trying again")
            upcoming = [rules.next_deadline(s, self.limits) for s in self.store.open_sessions()]
            wait = min([MAX_TIMER_SLEEP_S, *(t - self.clock() for t in upcoming)])
            self._wake.clear()
            stop_wait = asyncio.ensure_future(stop.wait())
            wake_wait = asyncio.ensure_future(self._wake.wait())
            await asyncio.wait([stop_wait, wake_wait], timeout=max(0.05, wait), return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            wake_wait.cancel()

    async def idle(self) -> None:
        """Wait until nothing runs in the background: notices told, model turns done (for tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def close(self) -> None:
        """Stop model turns in progress; their mark stays in the row, so the next start runs them again."""
        for task in list(self._turns.values()) + list(self._background):
            task.cancel()
        await asyncio.gather(*self._turns.values(), *self._background, return_exceptions=True)

    # --- inside ---------------------------------------------------------------------------------

    def _find(self, place: Place) -> Session:
        session = self.store.find_open(place.server_key, place.channel)
        if session is None:
            raise StorytimeError(messages.ST_NO_SESSION)
        return session

    def _session(self, place: Place) -> _Locked:
        """`async with self._session(place) as session`: the session here, loaded fresh under its lock."""
        return _Locked(self, self._find(place).session_id)

    def _after(self, session: Session, told: list[str]) -> None:
        """In the background, in order: tell the thread, run the model's turn if due, end the session if over."""
        self._wake.set()
        self._spawn(self._follow_up(session.session_id, told))

    def _spawn(self, coro: Coroutine) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _follow_up(self, session_id: str, told: list[str]) -> None:
        session = self.store.get(session_id)
        if session is None:
            return
        surface = self.surfaces.get(session.platform)
        if surface is None:
            return
        try:
            for line in told:
                await surface.say(session, line)
            session = self.store.get(session_id)
            if session.status != "open":
                return
            if session.model is not None and session_id not in self._turns:
                self._turns[session_id] = asyncio.current_task()
                try:
                    await self._model_turn(session_id, surface)
                finally:
                    self._turns.pop(session_id, None)
                session = self.store.get(session_id)
            if session.status == "open" and (reason := rules.end_reason(session, self.limits, self.clock())):
                await self._end(session_id, reason)
        except asyncio.CancelledError:
            raise
        except Exception:  # a front-end failure must not take the session down; the log has the rest
            logger.exception("storytime %s: telling the thread failed", session_id)

    async def _model_turn(self, session_id: str, surface: Surface) -> None:
        """Write the model's line (or a vote's two options, one after the other: one request at a time)."""
        while True:
            async with self._locks[session_id]:
                session = self.store.get(session_id)
                if session is None or session.status != "open" or session.model is None:
                    return
                session.model.attempts += 1
                self.store.save(session)  # marked before it is submitted: a restart runs it again
            kind, number = session.model.kind, len(session.model.options) + 1
            label = messages.ST_VOTE_OPTION.format(number=number) if kind == "vote" else messages.STORYTIME_BOT_NAME
            request = model_request(session, self.worker.config, self.limits, self.worker.lm.max_positions)
            try:
                text, error, ref = await write_line(self.worker, surface, session, label, request, self.limits,
                                                    lambda message: self._begun(session_id, message))
            except WorkerUnavailableError:  # shutting down: the mark stays, and the next start writes it
                async with self._locks[session_id]:
                    session = self.store.get(session_id)
                    if session is not None and session.model is not None:
                        session.model.attempts = max(0, session.model.attempts - 1)  # this start never ran
                        self.store.save(session)
                logger.info("storytime %s: worker unavailable; the model turn waits for the next start",
                            session_id)
                return
            kept, told = True, []
            async with self._locks[session_id]:
                current = self.store.get(session_id)
                if current is None or current.status != "open" or current.model is None:
                    kept = False  # ended or undone meanwhile: the line is not part of the story
                elif error is not None:
                    told = [messages.ST_MODEL_FAILED.format(error=error),
                            *rules.finish_model_turn(current, self.clock())]
                elif kind == "vote" and number < 2:
                    current.model.options.append(text)
                    current.model.attempts, current.model.message = 0, ""
                elif kind == "vote":
                    votes.open_vote(current, [*current.model.options, text], self.limits.vote_timeout_s,
                                    self.clock())
                else:
                    told = rules.add_model_line(current, text, self.clock())
                if kept and current.model is not None and error is None:
                    current.model.message = ""
                if kept:
                    self.store.save(current)
            if ref is not None:  # committed first: the thread never shows a line the story lacks
                await surface.settle(session, ref, label, text if kept else None)
            if not kept:
                return
            if error is None and kind == "vote" and number < 2:
                continue  # the second option
            if current.vote is not None:
                await surface.say(current, messages.ST_VOTE_OFFER.format(seconds=round(self.limits.vote_timeout_s)))
                await surface.offer_vote(current)
            for line in told:
                await surface.say(current, line)
            return

    async def _begun(self, session_id: str, message: str) -> None:
        """The model's line has a message in the thread: remember it, so a restart can mark it stopped."""
        async with self._locks[session_id]:
            session = self.store.get(session_id)
            if session is not None and session.model is not None:
                session.model.message = message
                self.store.save(session)

    def _close_vote(self, session: Session, timed_out: bool) -> list[str]:
        """Under the session's lock: the winning option becomes the model's line."""
        index, counts = votes.tally(session.vote)
        text = session.vote.options[index]
        wording = messages.ST_VOTE_TIMEOUT if timed_out else messages.ST_VOTE_RESULT
        result = wording.format(number=index + 1, votes=votes.describe_counts(counts))
        return [result, *rules.add_model_line(session, text, self.clock())]

    async def _end(self, session_id: str, reason: str) -> Session | None:
        """Archive the session and post the whole story as a Markdown file."""
        async with self._locks[session_id]:
            session = self.store.get(session_id)
            if session is None or session.status != "open":
                return None
            session.status, session.ended_reason = "ended", reason
            session.model, session.vote, session.turn, session.deadline = None, None, None, None
            self.store.save(session)
        turn = self._turns.get(session_id)
        if turn is not None and turn is not asyncio.current_task():
            turn.cancel()
        logger.info("storytime %s ended: %s", session_id, reason)
        people = ", ".join(f"{name} ({count})" for name, count in credits(session)) or "nobody"
        surface = self.surfaces.get(session.platform)
        if surface is not None:
            text = messages.ST_ENDED.format(title=session.title, lines=len(session.lines), people=people)
            try:
                await surface.attach(session, filename(session), to_markdown(session, self.clock()),
                                     f"{text} ({reason})")
            except Exception:
                logger.exception("storytime %s: posting the story failed", session_id)
        return session


class _Locked:
    """The session at a place, loaded under its lock; the lock is held until the block ends."""

    def __init__(self, service: StorytimeService, session_id: str) -> None:
        self._service, self._id = service, session_id
        self._lock = service._locks[session_id]

    async def __aenter__(self) -> Session:
        await self._lock.acquire()
        session = self._service.store.get(self._id)
        if session is None or session.status != "open":
            self._lock.release()
            raise StorytimeError(messages.ST_NO_SESSION)
        return session

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

