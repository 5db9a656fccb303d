"""The error every model-loading problem is reported with (one line, exit code 2)."""
from ap_erase_fast.errors import UserError


class ModelLoadError(UserError):
    """A model, checkpoint, vocabulary or parameter-set request that cannot be honoured.

    The message is one line that names the input and says how to fix it.
    """
