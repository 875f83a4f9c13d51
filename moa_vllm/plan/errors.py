"""The one error type for plan problems; its message always names the file and the field."""


class PlanError(ValueError):
    pass
