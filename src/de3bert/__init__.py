"""DE³-BERT: distance-enhanced early exiting for BERT-family classifiers."""
