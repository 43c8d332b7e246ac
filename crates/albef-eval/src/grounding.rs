//! Weakly supervised grounding (RefCOCO+) scoring: being written.
