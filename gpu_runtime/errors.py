"""Errors a job can end with. Their text goes back to the client as the job's failure reason."""


class JobError(Exception):
    """The job cannot run as asked (bad parameters, a missing model, an unsupported option)."""


class JobCancelled(Exception):
    """Every job of a pipeline call was cancelled: raised from the step callback, between two denoising steps, so
    the call stops there. Not a ``JobError``: a cancelled job is not reported as a failure of its parameters."""
