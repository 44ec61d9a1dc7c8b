"""The starter space file written by ``automl space new``."""

STARTER_SPACE = """\
# An automl search space. Check it with `automl space check FILE`,
# see what it searches with `automl space show FILE`, run it with `automl run FILE`.
name: my-study                    # the study name (else the file's stem)

data:
  dataset: digits                 # bundled: digits | iris | wine | breast_cancer | diabetes
  # path: data/my.csv             # or a file: .csv, .parquet, .npz (arrays X and y)
  # target: label                 # the column to predict
  # drop: [id]                    # columns to ignore
  # header: false                 # a CSV whose first row is data: columns x0, x1, ...
  task: auto                      # classification | regression | auto
  validation: 0.2                 # fraction the search is scored on
  test: 0.0                       # fraction kept for retrain's final score

model: mlp                        # mlp | cnn

train:
  epochs: 12
  patience: 4                     # early stopping on the objective; 0 = off

objective: val_accuracy           # or a list, e.g. [val_accuracy, n_params]

study:
  sampler: tpe                    # tpe | random | cmaes | gp | qmc | nsga2 | grid
  pruner: median                  # median | percentile | halving | hyperband | threshold | none
  seed: 0

# A list is a choice, {low, high, log, step} a range, a plain value is fixed.
space:
  optimizer:                      # each optimizer with its own parameters
    adam:
      lr: {low: 1.0e-4, high: 1.0e-1, log: true}
    sgd:
      lr: {low: 1.0e-3, high: 1.0, log: true}
      momentum: {low: 0.0, high: 0.99}
      nesterov: [false, true]
  loss: [cross_entropy, mse]
  batch_size: [32, 64, 128]
  hidden_units: {low: 32, high: 512, log: true}
  n_layers: {low: 1, high: 3}
  dropout: {low: 0.0, high: 0.4}
  activation: relu
"""
