//! Scoring as the reference's `test.py` and `BaseSystem._eval_step` (SPEC §11): per-sample edit distance
//! and normalised edit distance (ICDAR 2019 N.E.D.), per-dataset sums, the percentages test.py prints, the
//! sample-weighted "Combined" row and its markdown table, character for character.

pub mod paired;

/// test.py's "Benchmark (Subset)" group (`SceneTextDataModule.TEST_BENCHMARK_SUB`, same list as the full one).
pub const TEST_BENCHMARK_SUB: [&str; 9] = [
    "IIIT5k",
    "SVT",
    "IC13_1015",
    "IC15_1811",
    "IC15_2077",
    "SVTP",
    "CUTE80",
    "HOST",
    "WOST",
];

/// test.py's "Benchmark" group (`SceneTextDataModule.TEST_BENCHMARK`).
pub const TEST_BENCHMARK: [&str; 9] = TEST_BENCHMARK_SUB;

/// test.py's "New" group (`SceneTextDataModule.TEST_NEW`), evaluated with `--new`.
pub const TEST_NEW: [&str; 3] = ["ArT", "COCOv1.4", "Uber"];

/// test.py's result groups in print order: the two benchmark groups, then "New" when `new` is set.
pub fn result_groups(new: bool) -> Vec<(&'static str, &'static [&'static str])> {
    let mut groups: Vec<(&'static str, &'static [&'static str])> = vec![
        ("Benchmark (Subset)", &TEST_BENCHMARK_SUB),
        ("Benchmark", &TEST_BENCHMARK),
    ];
    if new {
        groups.push(("New", &TEST_NEW));
    }
    groups
}

/// Levenshtein distance over Unicode scalar values with unit costs and no transpositions, which is what
/// `nltk.edit_distance(pred, gt)` computes on Python strings.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() || b.is_empty() {
        return a.len().max(b.len());
    }
    // previous[j] = distance between the first i-1 chars of `a` and the first j chars of `b`.
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, &ca) in a.iter().enumerate() {
        current[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != cb);
            let deletion = previous[j + 1] + 1;
            let insertion = current[j] + 1;
            current[j + 1] = substitution.min(deletion).min(insertion);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// `edit_distance(pred, gt) / max(len(pred), len(gt))` in characters. Both empty gives 0 (the reference
/// would divide by zero, but its ground truth is never empty after filtering).
pub fn normalized_edit_distance(pred: &str, gt: &str) -> f64 {
    let longest = pred.chars().count().max(gt.chars().count());
    if longest == 0 {
        return 0.0;
    }
    edit_distance(pred, gt) as f64 / longest as f64
}

/// Running sums for one dataset, as `_eval_step` accumulates them; the percentages come from the accessors.
/// Records that could not be read are counted apart and are not part of `num_samples`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct DatasetResult {
    /// Dataset name as printed in the table.
    pub name: String,
    /// Scored samples.
    pub num_samples: usize,
    /// Samples whose prediction equals the ground truth exactly.
    pub correct: usize,
    /// Sum of per-sample normalised edit distances.
    pub ned_sum: f64,
    /// Sum of per-sample confidences (product of the kept probabilities, EOS included).
    pub confidence_sum: f64,
    /// Sum of prediction lengths in characters, after the charset adapter.
    pub label_length_sum: usize,
    /// Records skipped because their label or image could not be read or decoded.
    pub failed_records: usize,
}

impl DatasetResult {
    /// Empty sums for dataset `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Scores one sample: `pred` is the prediction after `CharsetAdapter(charset_test)`, `gt` the filtered
    /// label, `confidence` the decoded confidence (f32 product widened to f64, like `.item()`).
    pub fn add(&mut self, pred: &str, gt: &str, confidence: f64) {
        self.confidence_sum += confidence;
        self.ned_sum += normalized_edit_distance(pred, gt);
        if pred == gt {
            self.correct += 1;
        }
        self.num_samples += 1;
        self.label_length_sum += pred.chars().count();
    }

    /// Adds another partial result (e.g. one batch). Accumulating per batch of the reference's size and then
    /// merging reproduces test.py's floating-point summation order exactly.
    pub fn merge(&mut self, other: &DatasetResult) {
        self.num_samples += other.num_samples;
        self.correct += other.correct;
        self.ned_sum += other.ned_sum;
        self.confidence_sum += other.confidence_sum;
        self.label_length_sum += other.label_length_sum;
        self.failed_records += other.failed_records;
    }

    /// Word accuracy in percent: `100 * correct / total` (0 for an empty dataset, where test.py would fail).
    pub fn accuracy(&self) -> f64 {
        self.per_sample((100 * self.correct) as f64)
    }

    /// 1 - mean NED in percent: `100 * (1 - ned / total)`.
    pub fn one_minus_ned(&self) -> f64 {
        if self.num_samples == 0 {
            return 0.0;
        }
        100.0 * (1.0 - self.ned_sum / self.num_samples as f64)
    }

    /// Mean confidence in percent: `100 * confidence / total`.
    pub fn confidence(&self) -> f64 {
        self.per_sample(100.0 * self.confidence_sum)
    }

    /// Mean prediction length in characters: `label_length / total`.
    pub fn label_length(&self) -> f64 {
        self.per_sample(self.label_length_sum as f64)
    }

    fn per_sample(&self, total: f64) -> f64 {
        if self.num_samples == 0 {
            0.0
        } else {
            total / self.num_samples as f64
        }
    }

    /// The values of test.py's `Result(name, total, accuracy, mean_ned, mean_conf, mean_label_length)`.
    pub fn row(&self) -> ResultRow {
        ResultRow {
            dataset: self.name.clone(),
            num_samples: self.num_samples,
            accuracy: self.accuracy(),
            one_minus_ned: self.one_minus_ned(),
            confidence: self.confidence(),
            label_length: self.label_length(),
            failed_records: self.failed_records,
        }
    }
}

/// One printed table row: percentages (accuracy, 1 - NED, confidence) and the mean label length.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ResultRow {
    /// Dataset name, or `Combined`.
    pub dataset: String,
    /// Scored samples.
    pub num_samples: usize,
    /// Word accuracy, percent.
    pub accuracy: f64,
    /// 1 - mean normalised edit distance, percent.
    pub one_minus_ned: f64,
    /// Mean confidence, percent.
    pub confidence: f64,
    /// Mean prediction length, characters.
    pub label_length: f64,
    /// Unreadable records (not printed by the reference table; kept for reports).
    pub failed_records: usize,
}

/// The "Combined" row of `print_results_table`: each percentage weighted by its dataset's sample count,
/// summed in order and divided by the total (all zeros when there are no samples).
pub fn combined(results: &[DatasetResult]) -> ResultRow {
    let mut row = ResultRow {
        dataset: "Combined".to_owned(),
        num_samples: 0,
        accuracy: 0.0,
        one_minus_ned: 0.0,
        confidence: 0.0,
        label_length: 0.0,
        failed_records: 0,
    };
    for result in results {
        let n = result.num_samples as f64;
        row.num_samples += result.num_samples;
        row.accuracy += n * result.accuracy();
        row.one_minus_ned += n * result.one_minus_ned();
        row.confidence += n * result.confidence();
        row.label_length += n * result.label_length();
        row.failed_records += result.failed_records;
    }
    if row.num_samples > 0 {
        let total = row.num_samples as f64;
        row.accuracy /= total;
        row.one_minus_ned /= total;
        row.confidence /= total;
        row.label_length /= total;
    }
    row
}

/// The members of a result group that were evaluated, in the group's order (test.py indexes by name).
pub fn group_results(names: &[&str], results: &[DatasetResult]) -> Vec<DatasetResult> {
    names
        .iter()
        .filter_map(|name| results.iter().find(|result| result.name == *name))
        .cloned()
        .collect()
}

/// test.py's output for one group: the `"{group} set:"` line followed by [`markdown_table`].
pub fn results_table(group_name: &str, results: &[DatasetResult]) -> String {
    format!("{group_name} set:\n{}", markdown_table(results))
}

/// test.py's full report body: each group's [`results_table`] followed by the blank lines `print('\n')`
/// leaves (the timing line is not included).
pub fn results_report(groups: &[(&str, &[DatasetResult])]) -> String {
    groups
        .iter()
        .map(|(name, results)| format!("{}\n\n", results_table(name, results)))
        .collect()
}

/// `print_results_table` from test.py: a markdown table whose first column is as wide as the longest name
/// (at least `Combined`), counts right-aligned in 9, percentages with two decimals in the header widths,
/// a dashed rule and the sample-weighted `Combined` row. Every line ends with `\n`. When records could not be
/// read (and so are in no figure), a last `Unreadable` column counts them; otherwise the layout is test.py's.
pub fn markdown_table(results: &[DatasetResult]) -> String {
    let unreadable = results.iter().any(|r| r.failed_records > 0);
    let extra = |with: &'static str| if unreadable { with } else { "" };
    let width = results
        .iter()
        .map(|result| result.name.chars().count())
        .chain(["Dataset".len(), "Combined".len()])
        .max()
        .unwrap_or(0);
    let dashes = "-".repeat(width);
    let mut table = String::new();
    table.push_str(&format!(
        "| {:<width$} | # samples | Accuracy | 1 - NED | Confidence | Label Length |{}\n",
        "Dataset",
        extra(" Unreadable |")
    ));
    table.push_str(&format!(
        "|:{dashes}:|----------:|---------:|--------:|-----------:|-------------:|{}\n",
        extra("-----------:|")
    ));
    for result in results {
        table.push_str(&format_row(&result.row(), width, unreadable));
    }
    table.push_str(&format!(
        "|-{dashes}-|-----------|----------|---------|------------|--------------|{}\n",
        extra("------------|")
    ));
    table.push_str(&format_row(&combined(results), width, unreadable));
    table
}

fn format_row(row: &ResultRow, width: usize, unreadable: bool) -> String {
    let extra = if unreadable {
        format!(" {:>10} |", row.failed_records)
    } else {
        String::new()
    };
    format!(
        "| {:<width$} | {:>9} | {:>8.2} | {:>7.2} | {:>10.2} | {:>12.2} |{extra}\n",
        row.dataset,
        row.num_samples,
        row.accuracy,
        row.one_minus_ned,
        row.confidence,
        row.label_length
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_matches_nltk() {
        let cases = [
            ("", "", 0),
            ("abc", "abc", 0),
            ("", "abc", 3),
            ("abc", "", 3),
            ("kitten", "sitting", 3),
            ("ab", "ba", 2), // no transpositions
            ("flaw", "lawn", 2),
            ("caf\u{e9}", "cafe", 1), // characters, not bytes
            ("\u{65e5}\u{672c}\u{8a9e}", "\u{65e5}\u{672c}", 1),
            ("e\u{301}", "\u{e9}", 2), // no normalisation: two code points vs one
        ];
        for (a, b, expected) in cases {
            assert_eq!(edit_distance(a, b), expected, "{a:?} vs {b:?}");
            assert_eq!(edit_distance(b, a), expected, "{b:?} vs {a:?}");
        }
    }

    #[test]
    fn normalized_distance_edges() {
        assert_eq!(normalized_edit_distance("", ""), 0.0);
        assert_eq!(normalized_edit_distance("", "ab"), 1.0);
        assert_eq!(normalized_edit_distance("abc", "abc"), 0.0);
        assert_eq!(normalized_edit_distance("kitten", "sitting"), 3.0 / 7.0);
        assert_eq!(normalized_edit_distance("\u{e9}t\u{e9}", "ete"), 2.0 / 3.0);
    }

    #[test]
    fn per_dataset_sums_and_percentages() {
        let mut result = DatasetResult::new("SVT");
        result.add("abc", "abc", 0.9);
        result.add("", "ab", 0.5); // empty prediction: NED 1, length 0
        result.add("h\u{e9}llo", "hello", 0.25);
        result.failed_records = 2;
        assert_eq!(
            (result.num_samples, result.correct, result.label_length_sum),
            (3, 1, 8)
        );
        assert_eq!(result.ned_sum, 0.0 + 1.0 + 0.2);
        assert_eq!(result.accuracy(), 100.0 / 3.0);
        assert_eq!(result.one_minus_ned(), 100.0 * (1.0 - 1.2 / 3.0));
        assert_eq!(result.confidence(), 100.0 * 1.65 / 3.0);
        assert_eq!(result.label_length(), 8.0 / 3.0);
        let empty = DatasetResult::new("none");
        assert_eq!(
            (empty.accuracy(), empty.one_minus_ned(), empty.confidence()),
            (0.0, 0.0, 0.0)
        );

        let mut merged = DatasetResult::new("SVT");
        let mut batch = DatasetResult::new("SVT");
        batch.add("abc", "abc", 0.9);
        merged.merge(&batch);
        let mut batch = DatasetResult::new("SVT");
        batch.add("", "ab", 0.5);
        batch.add("h\u{e9}llo", "hello", 0.25);
        batch.failed_records = 2;
        merged.merge(&batch);
        assert_eq!(merged.num_samples, 3);
        assert_eq!(merged.failed_records, 2);
        assert_eq!(merged.correct, result.correct);
    }

    fn sample_results() -> Vec<DatasetResult> {
        let make = |name: &str, num_samples, correct, ned_sum, confidence_sum, label_length_sum| {
            DatasetResult {
                name: name.to_owned(),
                num_samples,
                correct,
                ned_sum,
                confidence_sum,
                label_length_sum,
                failed_records: 0,
            }
        };
        vec![
            make("IIIT5k", 3000, 2964, 9.25, 2901.5, 15_123),
            make("SVT", 647, 630, 4.0, 611.125, 3_512),
            make("COCOv1.4", 9825, 7600, 1047.5, 8000.0625, 50_000),
        ]
    }

    #[test]
    fn combined_is_sample_weighted() {
        let results = sample_results();
        let row = combined(&results);
        assert_eq!(row.num_samples, 3000 + 647 + 9825);
        let expected_accuracy = (3000.0 * results[0].accuracy()
            + 647.0 * results[1].accuracy()
            + 9825.0 * results[2].accuracy())
            / 13472.0;
        assert_eq!(row.accuracy, expected_accuracy);
        assert!((row.accuracy - 100.0 * (2964.0 + 630.0 + 7600.0) / 13472.0).abs() < 1e-9);
        assert!((row.label_length - 68_635.0 / 13472.0).abs() < 1e-12);
        let empty = combined(&[]);
        assert_eq!((empty.num_samples, empty.accuracy), (0, 0.0));
    }

    #[test]
    fn table_matches_test_py_layout() {
        // Expected text produced by running test.py's `print_results_table` on the same numbers.
        let expected = "\
Benchmark set:
| Dataset  | # samples | Accuracy | 1 - NED | Confidence | Label Length |
|:--------:|----------:|---------:|--------:|-----------:|-------------:|
| IIIT5k   |      3000 |    98.80 |   99.69 |      96.72 |         5.04 |
| SVT      |       647 |    97.37 |   99.38 |      94.46 |         5.43 |
| COCOv1.4 |      9825 |    77.35 |   89.34 |      81.43 |         5.09 |
|----------|-----------|----------|---------|------------|--------------|
| Combined |     13472 |    83.09 |   92.13 |      85.46 |         5.09 |
";
        assert_eq!(results_table("Benchmark", &sample_results()), expected);

        let long = vec![DatasetResult {
            name: "A_very_long_name".to_owned(),
            num_samples: 8,
            correct: 1,
            ned_sum: 0.125,
            confidence_sum: 1.0,
            label_length_sum: 1,
            failed_records: 0,
        }];
        let expected_long = "\
| Dataset          | # samples | Accuracy | 1 - NED | Confidence | Label Length |
|:----------------:|----------:|---------:|--------:|-----------:|-------------:|
| A_very_long_name |         8 |    12.50 |   98.44 |      12.50 |         0.12 |
|------------------|-----------|----------|---------|------------|--------------|
| Combined         |         8 |    12.50 |   98.44 |      12.50 |         0.12 |
";
        assert_eq!(markdown_table(&long), expected_long);
        let report = results_report(&[("New", &long)]);
        assert!(report.starts_with("New set:\n| Dataset "));
        assert!(report.ends_with("|         0.12 |\n\n\n"));

        // Records that could not be read are in no figure; the table counts them in a column of its own.
        let mut damaged = long;
        damaged[0].failed_records = 3;
        let expected_damaged = "\
| Dataset          | # samples | Accuracy | 1 - NED | Confidence | Label Length | Unreadable |
|:----------------:|----------:|---------:|--------:|-----------:|-------------:|-----------:|
| A_very_long_name |         8 |    12.50 |   98.44 |      12.50 |         0.12 |          3 |
|------------------|-----------|----------|---------|------------|--------------|------------|
| Combined         |         8 |    12.50 |   98.44 |      12.50 |         0.12 |          3 |
";
        assert_eq!(markdown_table(&damaged), expected_damaged);
    }

    #[test]
    fn groups_follow_test_py() {
        let groups = result_groups(true);
        let names: Vec<_> = groups.iter().map(|(name, _)| *name).collect();
        assert_eq!(names, ["Benchmark (Subset)", "Benchmark", "New"]);
        assert_eq!(groups[1].1.len(), 9);
        assert_eq!(result_groups(false).len(), 2);
        let results = sample_results();
        let picked = group_results(&TEST_BENCHMARK, &results);
        let picked: Vec<_> = picked.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(picked, ["IIIT5k", "SVT"]);
    }
}
