"""The API's operations: the service, principals, request/response schemas and domain
errors (no HTTP here: handlers.api maps errors to statuses)."""
