"""The Discord front's host: plugin loading, command sync, error handling, streamed replies.

Plugins import what they need from here (and from other public `core` names): the bot class,
the admin checks, channel keys, the streamed reply and the answer board.
"""

from .answers import Answer, AnswerBoard, StopView, queue_status
from .bot import LoracordBot, create_bot, intents_for
from .checks import (
    ChannelKey,
    NotAdmin,
    NotBotAdmin,
    admin_only,
    bot_admin_only,
    channel_key,
    channel_key_of,
    is_admin,
    is_bot_admin,
)
from .conversation import AnswerIndex, reply_chain
from .errors import cooldown_message, reply_ephemeral
from .runner import run_bot
from .streaming import (
    MESSAGE_LIMIT,
    NO_MENTIONS,
    PostFirst,
    PostMore,
    StreamedReply,
    split_message,
)

__all__ = [
    "MESSAGE_LIMIT",
    "NO_MENTIONS",
    "Answer",
    "AnswerBoard",
    "AnswerIndex",
    "ChannelKey",
    "LoracordBot",
    "NotAdmin",
    "NotBotAdmin",
    "PostFirst",
    "PostMore",
    "StopView",
    "StreamedReply",
    "admin_only",
    "bot_admin_only",
    "channel_key",
    "channel_key_of",
    "cooldown_message",
    "create_bot",
    "intents_for",
    "is_admin",
    "is_bot_admin",
    "queue_status",
    "reply_chain",
    "reply_ephemeral",
    "run_bot",
    "split_message",
]
