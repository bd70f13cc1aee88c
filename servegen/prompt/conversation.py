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

    def messages(self) -> list[dict]:
        """OpenAI-style messages; no system message when the system text is empty."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            messages.append({"role": "user", "content": turn.user})
            if turn.assistant is not None:
                messages.append({"role": "assistant", "content": turn.assistant})
        return messages
