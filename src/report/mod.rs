//! Presenting results: terminal tables of stage outputs (`saeflow show`); the HTML report comes later.

pub mod show;
