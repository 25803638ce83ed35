//! Being written (issue recommendation); see the issue tracker.
