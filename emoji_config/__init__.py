"""Caption → emoji mapping and the config it uses (see docs/emoji.md).

Importing this package is cheap: NLTK is imported when the first mapper is built, and nothing
touches the network until `EmojiConfigStore.load()`.
"""

from emoji_config.loader import EmojiConfigStore
from emoji_config.mapper import EmojiMapper

__all__ = ["EmojiConfigStore", "EmojiMapper"]
