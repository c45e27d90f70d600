"""Every line the bot says that is not a story, in one place, for Discord and Slack alike.

Errors from storygen carry their own wording (storygen/errors.py); this module holds
the bot's: help, queue status, settings, admin, and the rendering of notices.
"""

from __future__ import annotations

from storygen.genres import GENRES

HELP = """\
*StoryBot* writes a story from your opening, in the genre you pick.
• `/story <genre> <opening>`: e.g. `/story sci_fi After discovering time travel`
• `/story auto <opening>`: the genre is guessed from your opening
• `/story <opening>`: uses your default genre
• options at the end: `length=150 temperature=1.1 top_p=0.9 top_k=40 repetition_penalty=1.2 seed=7`
• `/story genres`: the genres, with an example opening each
• `/story settings`: your defaults; `/story settings temperature=1.1 length=150` to change them; `/story settings reset`
• `/story queue`: where your story is in line
• `/story cancel`: stop your story
• `/story continue`: carry on your last story in this channel
• `/story admin` (workspace admins): `allow` or `disallow` this channel, `everywhere`, `max_length=N`, `max_temperature=T`, `cooldown=SECONDS`
• `/story together …` (or `/storytime …`): write one story with others, in turns; `/story together help`"""

QUEUED = "⏳ queued, #{position} in line (about {eta} s)"
STARTED = "✍️ writing…"
NOTHING_TO_CANCEL = "You have no story in progress."
CANCELLED = "🛑 Cancelled your story."
NOT_YOURS = "Only the person who asked for this story can cancel it."
NOTHING_QUEUED = "You have no story in progress. The queue holds {depth} {stories}."
QUEUE_STATUS = "Your story is #{position} in line (about {eta} s); the queue holds {depth} {stories}."
RUNNING_STATUS = "Your story is being written now; the queue holds {depth} {stories}."
NOTHING_TO_CONTINUE = "There is no story of yours in this channel to continue yet; start one with `/story`."
STORY_GONE = "That story is no longer stored, so it can't be continued or regenerated; start a new one with `/story`."
SETTINGS_SAVED = "Saved. Your settings now:"
SETTINGS_RESET = "Your settings are back to the server defaults:"
CHANNEL_NOT_ALLOWED = "Stories are not enabled in this channel; ask an admin, or use one of: {channels}"
COOLDOWN = "You're on cooldown: try again in {seconds} s."
ADMIN_ONLY = ("Only admins can see or change the server's story settings "
              "(Manage Server on Discord; workspace admins and owners on Slack).")
ADMIN_SAVED = "Server story settings saved:"
ADMIN_SHOW = "Server story settings:"
STORY_FOOTER = "{genre} · {tokens} tokens · seed {seed}{ending}"
ENDING_CUT = " · trimmed at the length limit"
STORY_CANCELLED = "🛑 cancelled"
STORY_STOPPED = "⚠️ stopped before the end"
STORY_ATTACHED = "📎 This story is too long for a message: the whole of it is in a file in this message's thread."
REQUESTED_BY = "for {user}"
BUTTON_CONTINUE = "Continue"
BUTTON_REGENERATE = "Regenerate"
BUTTON_CANCEL = "Cancel"
CANT_POST = "I can't post in this channel; invite me with `/invite @StoryBot`, or use `/story` in a channel I'm in."


def plural(n: int, word: str = "story", many: str = "stories") -> str:
    return word if n == 1 else many


def queued(position: int, eta_s: float) -> str:
    return QUEUED.format(position=position + 1, eta=max(1, round(eta_s)))


def genres_text() -> str:
    lines = ["*Genres* (or `auto` to detect one from your opening):"]
    for g in GENRES:
        lines.append(f"• `{g.name}`: {g.description} _e.g. “{g.example}”_")
    return "\n".join(lines)


def footer(genre: str, tokens: int, seed: int, finish_reason: str) -> str:
    return STORY_FOOTER.format(genre=genre, tokens=tokens, seed=seed,
                               ending=ENDING_CUT if finish_reason == "length" else "")


# --- Discord ------------------------------------------------------------------------------------
# Slash-command and option descriptions are shown in Discord's command picker (at most 100 characters).

DISCORD_COMMANDS = {
    "story": "Write a story in a genre from your opening",
    "continue": "Carry on your last story in this channel",
    "settings": "Your story defaults",
    "settings show": "Show your defaults and where each value comes from",
    "settings set": "Change your defaults",
    "settings reset": "Go back to the server's defaults",
    "genres": "The genres, with an example opening each",
    "queue": "Where your story is in line",
    "cancel": "Stop your story in progress",
    "storyadmin": "Server story rules: channels, caps, cooldown (Manage Server)",
}
DISCORD_OPTIONS = {
    "genre": "A genre, or auto to guess it from your opening (or type the whole opening here)",
    "default_genre": "Your default genre, or auto to guess it from each opening",
    "prompt": "How the story starts, e.g. After discovering time travel",
    "length": "New tokens to write at most",
    "temperature": "Randomness: 0 always picks the likeliest word, higher is wilder",
    "top_p": "Sample only from the likeliest words that add up to this probability",
    "top_k": "Sample only from this many likeliest words (0: no limit)",
    "repetition_penalty": "Discourage repeating words (1: off)",
    "seed": "Same seed, settings and opening: the same story",
    "allow_channel": "Allow stories in this channel (once any is allowed, only those are)",
    "disallow_channel": "Stop allowing stories in this channel",
    "all_channels": "True: allow stories in every channel again",
    "max_length": "Cap on story length in tokens for this server",
    "max_temperature": "Cap on temperature for this server",
    "cooldown": "Seconds each member waits between stories (0: none)",
}
DISCORD_AUTO_CHOICE = "auto: guess the genre from your opening"
DISCORD_HELP = """\
**StoryBot** writes a story from your opening, in the genre you pick.
• `/story genre:sci_fi prompt:After discovering time travel`
• or type it all in the genre box: `/story sci_fi After discovering time travel`
• `/continue`, or the Continue button under a story: carry it on
• `/genres`, `/queue`, `/cancel`, `/settings show|set|reset`
• `/storytime start`: write one story together with others, in turns, in a thread (`/storytime help`)"""
SETTINGS_NOTHING_TO_SET = "nothing to set; pick at least one option, e.g. `/settings set temperature:1.1`"
STORY_TITLE = "📖 {genre}"
STORY_TITLE_CONTINUED = "📖 {genre}, continued"
STORY_TITLE_PAGE = "📖 {genre} ({page}/{pages})"
STORY_WRITING = "✍️ writing… {chars} characters so far"
STORY_FAILED = "⚠️ {error}"
STORY_IN_FILE = "The whole story is in the attached file ({chars} characters)."
STORY_FOR = "Story for {user}"
STORY_INTERRUPTED = "the bot restarted before your story was finished; please ask again"
STORY_MOVED = "⌛ This is taking a while: the story will appear as a new message in this channel."


# --- Group storytelling (/storytime) ---------------------------------------------------------------

STORYTIME_HELP = """\
*Storytime*: write one story together, in turns, with the model adding to it between you.
• `/storytime start <genre> [opening] [title="…"] [turns=N] [turn_timeout=SECONDS] [mode=turns|free|vote] [model_every=N]`
• `/storytime join`, `/storytime leave`: take part, or stop; turns go in the order people joined
• `/storytime add <line>`{reply_hint}
• `/storytime status`: the story so far, the players, whose turn it is
• `/storytime undo` (the starter or an admin): remove the last line
• `/storytime end`: post the whole story as a file and close the session
• `/storytime list` (admins): the open sessions here; `/storytime end <id>` ends one"""
STORYTIME_REPLY_HINT = ", or reply in the session's thread"
STORYTIME_BOT_NAME = "StoryBot"
ST_STARTED = ("📖 *{title}* ({genre}, {mode} mode) started by {starter}: {turns} turns, {timeout} per turn. "
              "Join with `/storytime join`.")
ST_STARTED_ACK = "Started *{title}*; it's in the thread."
ST_NO_SESSION = "There is no open storytime session here; start one with `/storytime start <genre> [opening]`."
ST_ALREADY_OPEN = "This channel already has an open storytime session ({title}); `/storytime end` closes it."
ST_TOO_MANY_SESSIONS = "This server already has {limit} open storytime sessions, the most allowed; end one first."
ST_TOO_MANY_PLAYERS = "This session already has {limit} players, the most allowed."
ST_LINE_TOO_LONG = "That line is {chars} characters; a line can be at most {limit}."
ST_EMPTY_LINE = "Add some text after `/storytime add`."
ST_TURNS_RANGE = "turns={value} is out of range; allowed: 1 to {limit}"
ST_TIMEOUT_RANGE = "turn_timeout={value} is out of range; allowed: {low:g} to {high:g} seconds"
ST_EVERY_RANGE = "model_every={value} is out of range; allowed: {low} to {high}"
ST_BAD_MODE = "mode={value!r} is not a mode; choose one of: {modes}"
ST_JOINED = "{name} joined; they are #{position} in the turn order."
ST_ALREADY_JOINED = "You are already in this session."
ST_LEFT = "{name} left the session."
ST_NOT_A_PLAYER = "You are not in this session; `/storytime join` first."
ST_NOT_YOUR_TURN = "It's {name}'s turn, not yours; wait for yours."
ST_MODEL_WRITING = "The model is writing its line; add yours once it's in."
ST_VOTING = "The players are choosing the model's next line; vote first."
ST_ADDED = "Added your line ({left} turns left)."
ST_NEXT = "Next: {name}'s turn ({timeout} to add a line)."
ST_NEXT_FREE = "Anyone may add the next line."
ST_SKIPPED = "⏰ {name}'s turn timed out and was skipped."
ST_REMOVED = "{name} missed {skips} turns in a row and is out of the turn order; `/storytime join` to come back."
ST_UNDO_ONLY = "Only the starter or an admin can undo a line."
ST_UNDO_NOTHING = "There is no line to undo."
ST_UNDO_BUSY = "Wait for the model's line (or the vote) to finish before undoing."
ST_UNDONE = "↩️ Removed the last line ({author}: “{text}”)."
ST_END_ONLY = "Only the starter or an admin can end this session."
ST_ENDED = "🏁 *{title}* is finished: {lines} lines by {people}. The whole story is attached."
ST_ENDED_ACK = "Ended *{title}*."
ST_END_TURNS = "the turns ran out"
ST_END_IDLE = "nobody added anything for an hour"
ST_END_EMPTY = "no players are left"
ST_END_ASKED = "ended by {name}"
ST_END_NOT_FOUND = "No open session here has the id {session_id}; `/storytime list` shows them."
ST_LIST_ONLY = "Only admins can list the server's storytime sessions."
ST_LIST_EMPTY = "No storytime sessions are open in this server."
ST_LIST_HEAD = "Open storytime sessions (end one with `/storytime end <id>`):"
ST_LIST_LINE = "• `{session_id}` *{title}* in <#{channel}>: {players} players, {lines} lines, started by {starter}"
ST_STATUS = "*{title}* ({genre}, {mode} mode): {lines} lines, {left} turns left.\nPlayers: {players}.\n{whose}"
ST_STATUS_TURN = "It's {name}'s turn ({seconds} s left)."
ST_STATUS_FREE = "Anyone may add a line."
ST_STATUS_MODEL = "The model is writing."
ST_STATUS_VOTE = "The players are voting on the model's next line."
ST_STATUS_CUT = "_(the last part; `/storytime end` posts the whole story)_"
ST_MODEL_FAILED = "⚠️ The model could not write its line ({error}); carry on without it."
ST_MODEL_RERUN = "↻ The bot restarted while the model was writing; it is writing that line again."
ST_MODEL_DROPPED = "⚠️ The model's line was interrupted twice by restarts; carry on without it."
ST_VOTE_OFFER = "🗳️ Pick the model's next line: vote with the buttons within {seconds} s (a tie picks the first)."
ST_VOTE_OPTION = "Option {number}"
ST_VOTE_BUTTONS = "🗳️ Your vote:"
ST_VOTE_ONLY_PLAYERS = "Only players can vote; `/storytime join` first."
ST_VOTE_CLOSED = "That vote is already over."
ST_VOTE_CAST = "You voted for option {number}."
ST_VOTE_CHANGED = "You changed your vote to option {number}."
ST_VOTE_RESULT = "🗳️ Option {number} wins ({votes})."
ST_VOTE_TIMEOUT = "🗳️ Time's up: option {number} wins ({votes})."
ST_MISSING_LINES = "[… {count} earlier {lines} of the story left out here …]"
ST_EXPORT_CREDITS = "Credits"
ST_EXPORT_MODEL = "StoryBot (the model)"
ST_LINE = "*{name}*: {text}"
ST_STARTED_ACK_DISCORD = "Started **{title}** in <#{thread}>."
ST_CANT_OPEN_THREAD = ("I can't open a thread here: I need the Create Public Threads and Send Messages in Threads "
                       "permissions in this channel.")
ST_START_IN_CHANNEL = "Start a storytime session in a text channel: it opens a thread of its own there."
DISCORD_STORYTIME_HELP = """\
**Storytime**: write one story together, in turns, with the model adding to it between you.
• `/storytime start genre:<genre>` (opening, title, turns, turn_timeout, mode: turns, free or vote): opens a thread
• `/storytime join`, `/storytime leave`: take part, or stop; turns go in the order people joined
• `/storytime add text:<line>`{reply_hint}
• `/storytime status`, `/storytime undo` (the starter or a Manage Server admin), `/storytime end`
• `/storytime list` (Manage Server): the open sessions here; `/storytime end session:<id>` ends one"""
DISCORD_STORYTIME_NO_REPLIES = (" (replies in the thread don't count on this bot: its operator has not enabled "
                                "the Message Content intent)")
DISCORD_COMMANDS.update({
    "storytime": "Write a story together, in turns, with the model",
    "storytime start": "Open a storytime session in a new thread off this channel",
    "storytime join": "Take part in the session here",
    "storytime leave": "Stop taking part in the session here",
    "storytime add": "Add your line when it's your turn",
    "storytime status": "The story so far, the players and whose turn it is",
    "storytime undo": "Remove the last line (the starter or an admin)",
    "storytime end": "Post the whole story as a file and close the session",
    "storytime list": "The open sessions in this server (Manage Server)",
    "storytime help": "How storytime works",
})
DISCORD_OPTIONS.update({
    "opening": "The story's first line, credited to you",
    "title": "The story's title (also the thread's name)",
    "turns": "Lines people add before the session ends",
    "turn_timeout": "Seconds each player has for their turn before it is skipped",
    "mode": "turns: in join order; free: anyone, any time; vote: players pick between two model lines",
    "model_every": "The model writes after every this many lines",
    "text": "Your line of the story",
    "session": "A session id from /storytime list (admins)",
})
