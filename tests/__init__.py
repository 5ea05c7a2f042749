"""The test suite. A package, so that tests and their subprocesses import `tests.helpers`."""
