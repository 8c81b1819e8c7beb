"""ultraplan.backends: emitters that turn a Plan into files. They read the Plan; they decide nothing."""
