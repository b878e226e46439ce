"""Errors a job can end with. Their text goes back to the client as the job's failure reason."""


class JobError(Exception):
    """The job cannot run as asked (bad parameters, a missing model, an unsupported option)."""
