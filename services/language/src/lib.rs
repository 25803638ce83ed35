//! Being written (issue language); see the issue tracker.
