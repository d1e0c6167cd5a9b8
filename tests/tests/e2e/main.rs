//! The end-to-end tests: one test binary with one module per area, so the harness and the
//! dependencies link once. Every test runs the real `sandboxd`, `sandboxd-helper` and `sbx`
//! binaries (see the `sandboxd_tests` harness); a test of both modes is one function
//! `test(mode: Mode)` that `both_modes!(test)` runs once per mode (`area::test::privileged`,
//! `area::test::rootless`), so a failure in one mode never hides the result of the other.

#![allow(clippy::unwrap_used)] // Test code: a panic is the failure report.

mod api;
mod artifacts;
mod at_rest;
mod auth;
mod browser;
mod cgroup_v2;
mod cli;
mod cli_habits;
mod contract;
mod defaults;
mod egress;
mod egress_hub;
mod exec;
mod files;
mod host_view;
mod hostile;
mod image_config;
mod images;
mod isolation;
mod lifecycle;
mod limits;
mod logs;
mod mistakes;
mod network;
mod ports;
mod process_model;
mod quotas;
mod rootless;
mod seccomp;
mod smoke;
mod transport;
mod uid_ranges;
