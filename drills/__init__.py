"""Fault drills: tools people run against a throw-away stack, apart from the library and the tests.

`python -m drills.chaos` (`make chaos`) kills services and the broker during a large upload and
checks every total against a brute force over the uploaded file; `python -m drills.soak`
(`make soak`) uploads and queries for a while and watches each service's memory. Both start
their own broker and services on free ports (see drills.stack), so a developer's stack and the
shared test broker are never touched, and both tear everything down whatever happens.
"""
