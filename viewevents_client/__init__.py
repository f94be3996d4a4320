"""The typed Python client of the view-event API: uploads (plain and resumable), event files, queries."""
