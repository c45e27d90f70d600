"""Group storytelling: people and the model write one story together, in turns, in a thread.

Platform-neutral, like bot/service.py: no chat library is imported here. A front-end
turns its events into calls on `StorytimeService` (service.py) and gives it a `Surface`
(surface.py) to speak in the session's thread.

    session.py   the session, its lines, players, vote and pending model turn
    limits.py    the caps and defaults (players, turns, line length, sessions per server)
    rules.py     turn order, joining and leaving, timeouts and skips, undo
    votes.py     vote mode: casting, changing and counting votes
    prompt.py    the model turn's prompt: the opening plus as much recent story as fits
    store.py     the sessions in the bot's SQLite file
    export.py    the finished story as Markdown, with credits
    grammar.py   `/storytime …` and `/story together …` text into commands
    describe.py  status and list as text
    service.py   what front-ends call; model_turns.py runs the model's turns
"""
