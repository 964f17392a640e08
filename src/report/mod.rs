//! Presenting results: terminal tables of stage outputs (`saeflow show`) and the self-contained HTML report
//! (`saeflow report`, charts as inline SVG).

pub mod html;
pub mod show;
pub mod svg;
