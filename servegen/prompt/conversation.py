"""A filled-in conversation: the system text and the user/assistant turns, the last one open."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str | None = None  # None only for the last turn: the one the model answers


@dataclass(frozen=True)
class Conversation:
    system: str  # "" for none
    turns: tuple[Turn, ...]

    def messages(self, drop_empty_system: bool = True) -> list[dict]:
        """OpenAI-style messages; an empty system text gives no system message unless
        drop_empty_system=False (some chat templates, Gemma 2's, refuse any system message)."""
        messages = [{"role": "system", "content": self.system}] if self.system or not drop_empty_system else []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            if turn.assistant is not None:
                messages.append({"role": "assistant", "content": turn.assistant})
        return messages
