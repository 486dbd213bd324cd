"""The error root. Each error names what went wrong and carries its HTTP status;
the gateway maps them to JSON in one place."""

from __future__ import annotations


class OdstError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class PackageNameInvalid(OdstError):
    status, code = 400, "package_name_invalid"


class ExtensionNotAllowed(OdstError):
    status, code = 415, "extension_not_allowed"


class PackageNotFound(OdstError):
    status, code = 404, "package_not_found"


class PackageConflict(OdstError):
    status, code = 409, "package_conflict"


class UploadTooLarge(OdstError):
    status, code = 413, "upload_too_large"


class UploadIncomplete(OdstError):
    status, code = 400, "upload_incomplete"


class InsufficientStorage(OdstError):
    status, code = 507, "insufficient_storage"


class TooManyUploads(OdstError):
    status, code = 429, "too_many_uploads"
    retry_after = 5  # seconds: about the least a large upload in progress takes to end


class StageInvalid(OdstError):
    status, code = 400, "stage_invalid"


class RequestInvalid(OdstError):
    status, code = 400, "request_invalid"


class Unauthorized(OdstError):
    status, code = 401, "unauthorized"


class Forbidden(OdstError):
    status, code = 403, "forbidden"


class NotFound(OdstError):
    status, code = 404, "not_found"


class Unavailable(OdstError):
    status, code = 503, "unavailable"


class JamfUnavailable(OdstError):
    """Jamf Pro refused or could not be reached; the detail is Jamf Pro's answer."""
    status, code = 502, "jamf_unavailable"
