//! ztna tunnel core.
