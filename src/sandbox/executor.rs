//! The executor: builds the bubblewrap (or `host`) command for a job, starts
//! it in its own process group, caps and hashes its output, enforces the
//! timeout, and kills whole process groups.
