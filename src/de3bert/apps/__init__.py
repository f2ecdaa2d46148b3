"""What users run: the command line, the prediction service, batch prediction and the wall-clock benchmark."""
