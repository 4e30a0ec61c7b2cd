"""The one error type for bad input: it names what is wrong and how to fix it.

Every reader, card loader and tokenizer raises `InputError` instead of letting a
shape or dtype error surface from deep inside numpy or torch.
"""


class InputError(ValueError):
    """Bad user input: names the field (or file), the problem, and the fix."""

    def __init__(self, field: str, problem: str, fix: str = ""):
        self.field, self.problem, self.fix = field, problem, fix
        message = f"{field}: {problem}"
        if fix:
            message += f" -- {fix}"
        super().__init__(message)

    def __reduce__(self):
        # rebuilt from its three parts (not the formatted message), so that it crosses process
        # boundaries intact: a worker process's error reaches the parent as the same InputError
        return type(self), (self.field, self.problem, self.fix)
